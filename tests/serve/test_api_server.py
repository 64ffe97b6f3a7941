"""The OpenAI-compatible API end to end: a real node, a real uvicorn server, the official client.

A user sees: three models behind one endpoint; completions and chat, streamed or not, give exactly
transformers' greedy tokens; usage counts are right; bad requests get an OpenAI-format error that
says what to fix, and the server keeps serving; a client that goes away frees its request.

The suite runs twice: on one machine (metadata in process, one api server), and as a cluster sharing a
real `redis-server` (two api servers and one node; the `client` fixture talks to one api server and
the `http` fixture to the other, so every kind of request is served by both).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from aegaeon.config import MIB, EngineConfig, NodeConfig
from aegaeon.engine.tokenizer import Tokenizer
from aegaeon.instance.node import Node
from aegaeon.serve.api_server import build_app
from aegaeon.serve.backend import ClusterBackend
from aegaeon.serve.metadata import MemoryStore, RedisStore, RequestState
from aegaeon.serve.node_server import NodeServer
from aegaeon.serve.streaming import sse_event
from tests.serve.http_server import ServerThread
from tests.serve.redis_server import RedisServer

MODELS = ("llama", "qwen2", "mistral")
TOKENS = 8
KV_BYTES = 4 * MIB
API_KEY = "test-key-0123"
OTHER_KEY = "test-key-4567"
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a river."}]
DRAIN_TIMEOUT_S = 20.0
POLL_S = 0.02


@pytest.fixture(scope="module")
def model_dirs(five_model_dirs):
    return {name: five_model_dirs[name] for name in MODELS}


@pytest.fixture(scope="module")
def tokenizers(model_dirs) -> dict[str, Tokenizer]:
    return {name: Tokenizer.from_pretrained(path) for name, path in model_dirs.items()}


@pytest.fixture(scope="module")
def node(model_dirs, profile_path):
    config = NodeConfig(profile_path=str(profile_path), engine=EngineConfig(kv_cache_bytes=KV_BYTES))
    with Node(model_dirs, config, progress=False) as node:
        yield node


class Cluster:
    """The node served over a metadata store, and the api servers in front of it."""

    def __init__(self, node: Node, stores: list, api_servers: list[ServerThread], node_server: NodeServer):
        self.node = node
        self.stores = stores
        self.api_servers = api_servers
        self.node_server = node_server

    @property
    def store(self):
        return self.stores[0]


@pytest.fixture(scope="module", params=["memory", "redis"])
def cluster(request, node):
    if request.param == "memory":
        stores = [MemoryStore()]
        redis_server = None
    else:
        redis_server = RedisServer().__enter__()
        stores = [RedisStore(redis_server.url) for _ in range(3)]  # the node's, and each api server's
    node_server = NodeServer(node, stores[0])
    api_servers = [ServerThread(build_app(ClusterBackend(store))) for store in stores[-2:]]
    try:
        for server in api_servers:
            server.__enter__()
        yield Cluster(node, stores, api_servers, node_server)
    finally:
        for server in api_servers:
            server.__exit__(None, None, None)
        node_server.close()
        for store in stores:
            store.close()
        if redis_server is not None:
            redis_server.__exit__(None, None, None)


@pytest.fixture(scope="module")
def server(cluster) -> ServerThread:
    return cluster.api_servers[0]


@pytest.fixture(scope="module")
def client(cluster) -> openai.OpenAI:
    url = cluster.api_servers[0].url
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(cluster):
    with httpx.Client(base_url=cluster.api_servers[-1].url, timeout=60) as http:
        yield http


def expected_text(model_dirs, tokenizers, hf_greedy, model: str, prompt_ids: list[int], tokens: int = TOKENS):
    return tokenizers[model].decode(hf_greedy(model_dirs[model], prompt_ids, tokens))


def sse_events(lines) -> list[dict | str]:
    """The `data:` payloads of an SSE body, JSON-decoded except the final `[DONE]`."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def wait_idle(node: Node) -> None:
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while node.live and time.monotonic() < deadline:
        time.sleep(POLL_S)
    assert not node.live, list(node.live)


# -- models, health, tokenizer tools -----------------------------------------------------------------


def test_models_are_listed_with_their_context(client, http, node):
    listed = client.models.list()
    assert [m.id for m in listed.data] == list(MODELS)
    assert all(m.object == "model" and m.owned_by == "aegaeon" and m.created > 0 for m in listed.data)
    raw = http.get("/v1/models").json()
    assert raw["object"] == "list"
    assert [m["max_model_len"] for m in raw["data"]] == [node.models[name].max_model_len for name in MODELS]
    assert client.models.retrieve("qwen2").id == "qwen2"
    missing = http.get("/v1/models/gpt-9")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


def test_health(http):
    response = http.get("/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"
    assert response.json()["models"] == list(MODELS)


def test_tokenize_and_detokenize_use_the_models_tokenizer(http, tokenizers):
    tokenizer = tokenizers["qwen2"]
    body = http.post("/tokenize", json={"model": "qwen2", "prompt": "The harbor at night"}).json()
    assert body["tokens"] == tokenizer.encode("The harbor at night")
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 512
    chat = http.post("/tokenize", json={"model": "qwen2", "messages": MESSAGES}).json()
    assert chat["tokens"] == tokenizer.apply_chat_template(MESSAGES)
    text = http.post("/detokenize", json={"model": "qwen2", "tokens": body["tokens"]}).json()
    assert text == {"prompt": "The harbor at night"}
    both = http.post("/tokenize", json={"model": "qwen2", "prompt": "a", "messages": MESSAGES})
    assert both.status_code == 400 and "exactly one of prompt and messages" in both.json()["error"]["message"]


# -- generation --------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_greedy_completion_equals_transformers(client, model, model_dirs, tokenizers, hf_greedy):
    prompt = "The market at dawn"
    prompt_ids = tokenizers[model].encode(prompt)
    completion = client.completions.create(model=model, prompt=prompt, max_tokens=TOKENS, **GREEDY)
    assert completion.id.startswith("cmpl-") and completion.object == "text_completion"
    assert completion.model == model and completion.created > 0
    [choice] = completion.choices
    assert choice.text == expected_text(model_dirs, tokenizers, hf_greedy, model, prompt_ids)
    assert choice.finish_reason == "length" and choice.index == 0
    assert completion.usage.prompt_tokens == len(prompt_ids)
    assert completion.usage.completion_tokens == TOKENS
    assert completion.usage.total_tokens == len(prompt_ids) + TOKENS


def test_token_id_prompts_and_a_list_of_one_prompt(client, model_dirs, tokenizers, hf_greedy):
    ids = [5, 17, 300, 42]
    want = expected_text(model_dirs, tokenizers, hf_greedy, "llama", ids)
    for prompt in (ids, [ids]):
        completion = client.completions.create(model="llama", prompt=prompt, max_tokens=TOKENS, **GREEDY)
        assert completion.choices[0].text == want
        assert completion.usage.prompt_tokens == len(ids)
    text = client.completions.create(model="llama", prompt=["A lighthouse"], max_tokens=TOKENS, **GREEDY)
    assert text.usage.prompt_tokens == len(tokenizers["llama"].encode("A lighthouse"))


def test_completions_default_to_16_tokens_and_chat_to_the_context(client, node):
    completion = client.completions.create(model="mistral", prompt="Once", **GREEDY)
    assert completion.usage.completion_tokens == 16
    chat = client.chat.completions.create(model="mistral", messages=MESSAGES, **GREEDY)
    assert chat.usage.total_tokens == node.models["mistral"].max_model_len
    assert chat.choices[0].finish_reason == "length"


@pytest.mark.parametrize("model", MODELS)
def test_greedy_chat_equals_transformers(client, model, model_dirs, tokenizers, hf_greedy):
    prompt_ids = tokenizers[model].apply_chat_template(MESSAGES)
    chat = client.chat.completions.create(
        model=model, messages=MESSAGES, max_completion_tokens=TOKENS, user="someone", **GREEDY
    )
    assert chat.id.startswith("chatcmpl-") and chat.object == "chat.completion"
    [choice] = chat.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == expected_text(model_dirs, tokenizers, hf_greedy, model, prompt_ids)
    assert choice.finish_reason == "length"
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (len(prompt_ids), TOKENS)
    # The deprecated max_tokens means the same.
    old = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=TOKENS, **GREEDY)
    assert old.choices[0].message.content == choice.message.content


def _run(client, kind: str, model: str, stream: bool) -> tuple[str, int, int]:
    """One request; (text, prompt tokens, completion tokens). Streams ask for usage."""
    common = {"model": model, "stream": stream, **GREEDY}
    if stream:
        common["stream_options"] = {"include_usage": True}
    if kind == "chat":
        response = client.chat.completions.create(messages=MESSAGES, max_completion_tokens=TOKENS, **common)
    else:
        response = client.completions.create(prompt="Bread and honey", max_tokens=TOKENS, **common)
    if not stream:
        choice = response.choices[0]
        text = choice.message.content if kind == "chat" else choice.text
        return text, response.usage.prompt_tokens, response.usage.completion_tokens
    chunks = list(response)
    *content, last = chunks
    assert last.choices == [] and last.usage is not None  # include_usage: a final usage-only chunk
    assert all(chunk.usage is None for chunk in content)
    assert len({chunk.id for chunk in chunks}) == 1
    finishes = [c.choices[0].finish_reason for c in content if c.choices[0].finish_reason]
    assert finishes == ["length"]
    if kind == "chat":
        assert content[0].choices[0].delta.role == "assistant"
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        text = "".join(c.choices[0].delta.content or "" for c in content)
    else:
        text = "".join(c.choices[0].text for c in content)
    return text, last.usage.prompt_tokens, last.usage.completion_tokens


def test_concurrent_streaming_and_plain_requests_agree(client, node, model_dirs, tokenizers, hf_greedy):
    jobs = [
        (kind, model, stream)
        for kind in ("chat", "completion")
        for model in MODELS
        for stream in (False, True)
    ]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: _run(client, *job), jobs))
    for (kind, model, _), (text, prompt_tokens, completion_tokens) in zip(jobs, results, strict=True):
        tokenizer = tokenizers[model]
        ids = (
            tokenizer.apply_chat_template(MESSAGES) if kind == "chat" else tokenizer.encode("Bread and honey")
        )
        assert text == expected_text(model_dirs, tokenizers, hf_greedy, model, ids), (kind, model)
        assert (prompt_tokens, completion_tokens) == (len(ids), TOKENS)
    wait_idle(node)


def test_raw_stream_is_sse_ending_in_done(http):
    body = {"model": "qwen2", "prompt": "Hi", "max_tokens": 3, "stream": True, "ignore_eos": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.iter_lines())
    assert events[-1] == "[DONE]"
    assert all(event["object"] == "text_completion" for event in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_an_event_stays_one_line_for_readers_that_split_on_unicode_line_breaks():
    """Generated text may hold NEL, LINE or PARAGRAPH SEPARATOR; httpx's iter_lines splits on them."""
    text = "a\x85b\u2028c\u2029d\ne"
    event = sse_event({"choices": [{"text": text}]})
    lines = [line for line in event.splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("data: ")
    assert json.loads(lines[0].removeprefix("data: "))["choices"][0]["text"] == text


def test_n_choices_with_a_seed_are_distinct_and_reproducible(client):
    request = {"model": "llama", "prompt": "The sea", "max_tokens": TOKENS, "n": 2, "seed": 11}
    request |= {"temperature": 1.0, "extra_body": {"ignore_eos": True}}
    first = client.completions.create(**request)
    assert sorted(c.index for c in first.choices) == [0, 1]
    texts = {c.index: c.text for c in first.choices}
    assert texts[0] != texts[1]
    assert first.usage.completion_tokens == 2 * TOKENS
    again = client.completions.create(**request)
    assert {c.index: c.text for c in again.choices} == texts
    streamed = {0: "", 1: ""}
    for chunk in client.completions.create(stream=True, **request):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == texts


def test_stop_strings_cut_the_text(client):
    base = client.completions.create(model="qwen2", prompt="Count:", max_tokens=12, **GREEDY)
    text = base.choices[0].text
    stop = text[4:7]
    assert stop.strip(), text
    want = text[: text.index(stop)]
    for stops in (stop, [stop, "never-generated-zzz"]):
        cut = client.completions.create(model="qwen2", prompt="Count:", max_tokens=12, stop=stops, **GREEDY)
        assert (cut.choices[0].text, cut.choices[0].finish_reason) == (want, "stop")
    streamed = client.completions.create(
        model="qwen2", prompt="Count:", max_tokens=12, stop=stop, stream=True, **GREEDY
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_token_ids(client, tokenizers):
    base = client.completions.create(model="llama", prompt=[7, 8, 9], max_tokens=TOKENS, logprobs=0, **GREEDY)
    tokens = base.choices[0].logprobs.tokens
    stop_id = tokenizers["llama"].encode(tokens[2], add_special_tokens=False)
    assert len(stop_id) == 1, tokens
    extra = {"ignore_eos": True, "stop_token_ids": stop_id}
    cut = client.completions.create(
        model="llama", prompt=[7, 8, 9], max_tokens=TOKENS, temperature=0, extra_body=extra
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens <= 3


def test_logprobs_have_the_openai_shapes(client):
    completion = client.completions.create(model="mistral", prompt="Hi", max_tokens=4, logprobs=2, **GREEDY)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert "".join(logprobs.tokens) == completion.choices[0].text
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(4)]
    for token_logprob, top in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert 1 <= len(top) <= 2 and token_logprob <= 0
        assert token_logprob == pytest.approx(max(top.values()))  # greedy took the most likely token

    chat = client.chat.completions.create(
        model="mistral", messages=MESSAGES, max_completion_tokens=4, logprobs=True, top_logprobs=3, **GREEDY
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 4
    assert "".join(entry.token for entry in content) == chat.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert bytes(entry.bytes).decode() == entry.token

    streamed = client.chat.completions.create(
        model="mistral", messages=MESSAGES, max_completion_tokens=4, logprobs=True, stream=True, **GREEDY
    )
    entries = [
        e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert [e.token for e in entries] == [e.token for e in content]
    plain = client.chat.completions.create(model="mistral", messages=MESSAGES, max_completion_tokens=2)
    assert plain.choices[0].logprobs is None


# -- bad requests ------------------------------------------------------------------------------------

LONG_PROMPT = list(range(3, 603))  # 600 tokens; the demo models' context is 512

BAD_REQUESTS = [
    # (id, path, JSON body or raw bytes, status, code, words the message must contain)
    ("malformed-json", "/v1/completions", b'{"model": "llama", "prompt": ', 400, "invalid_json", ["JSON"]),
    ("not-an-object", "/v1/chat/completions", b"[1, 2]", 400, None, ["object"]),
    (
        "unknown-model",
        "/v1/completions",
        {"model": "gpt-9", "prompt": "x"},
        404,
        "model_not_found",
        ["gpt-9"],
    ),
    (
        "unknown-chat-model",
        "/v1/chat/completions",
        {"model": "gpt-9", "messages": MESSAGES},
        404,
        "model_not_found",
        ["gpt-9", "llama"],
    ),
    (
        "negative-max-tokens",
        "/v1/completions",
        {"model": "llama", "prompt": "x", "max_tokens": -5},
        400,
        "invalid_value",
        ["max_tokens", "greater than or equal to 1"],
    ),
    (
        "over-long-prompt",
        "/v1/completions",
        {"model": "llama", "prompt": LONG_PROMPT},
        400,
        "context_length_exceeded",
        ["600 tokens", "max_model_len", "512"],
    ),
    (
        "over-long-chat",
        "/v1/chat/completions",
        {"model": "qwen2", "messages": [{"role": "user", "content": "word " * 600}]},
        400,
        "context_length_exceeded",
        ["max_model_len", "512"],
    ),
    (
        "string-max-tokens",
        "/v1/completions",
        {"model": "llama", "prompt": "x", "max_tokens": "ten"},
        400,
        "invalid_value",
        ["max_tokens", "valid integer", "'ten'"],
    ),
    (
        "string-temperature",
        "/v1/chat/completions",
        {"model": "llama", "messages": MESSAGES, "temperature": "hot"},
        400,
        "invalid_value",
        ["temperature", "valid number"],
    ),
    (
        "negative-temperature",
        "/v1/completions",
        {"model": "llama", "prompt": "x", "temperature": -1},
        400,
        "invalid_value",
        ["temperature must be >= 0"],
    ),
    (
        "top-p-out-of-range",
        "/v1/completions",
        {"model": "llama", "prompt": "x", "top_p": 2},
        400,
        "invalid_value",
        ["top_p", "(0, 1]"],
    ),
    (
        "missing-messages",
        "/v1/chat/completions",
        {"model": "llama"},
        400,
        "missing_required_parameter",
        ["messages"],
    ),
    ("missing-prompt", "/v1/completions", {"model": "llama"}, 400, "missing_required_parameter", ["prompt"]),
    ("missing-model", "/v1/completions", {"prompt": "x"}, 400, "missing_required_parameter", ["model"]),
    ("empty-messages", "/v1/chat/completions", {"model": "llama", "messages": []}, 400, None, ["messages"]),
    (
        "messages-not-a-list",
        "/v1/chat/completions",
        {"model": "llama", "messages": "hi"},
        400,
        None,
        ["list"],
    ),
    (
        "bad-role",
        "/v1/chat/completions",
        {"model": "llama", "messages": [{"role": "robot", "content": "hi"}]},
        400,
        "invalid_value",
        ["messages[0].role", "'user'", "'robot'"],
    ),
    (
        "content-not-text",
        "/v1/chat/completions",
        {"model": "llama", "messages": [{"role": "user", "content": 5}]},
        400,
        None,
        ["messages[0].content", "string"],
    ),
    (
        "token-outside-vocab",
        "/v1/completions",
        {"model": "llama", "prompt": [1, 10**6]},
        400,
        None,
        ["outside the vocabulary"],
    ),
    (
        "several-prompts",
        "/v1/completions",
        {"model": "llama", "prompt": ["a", "b"]},
        400,
        None,
        ["one prompt"],
    ),
    ("empty-prompt", "/v1/completions", {"model": "llama", "prompt": ""}, 400, None, ["empty"]),
    (
        "stream-options-without-stream",
        "/v1/completions",
        {"model": "llama", "prompt": "x", "stream_options": {"include_usage": True}},
        400,
        None,
        ["stream_options", "stream"],
    ),
    (
        "top-logprobs-too-many",
        "/v1/chat/completions",
        {"model": "llama", "messages": MESSAGES, "logprobs": True, "top_logprobs": 50},
        400,
        None,
        ["top_logprobs", "20"],
    ),
    ("echo", "/v1/completions", {"model": "llama", "prompt": "x", "echo": True}, 400, None, ["echo"]),
    (
        "unknown-route",
        "/v1/embeddings",
        {"model": "llama", "input": "x"},
        404,
        "not_found",
        ["/v1/embeddings"],
    ),
    (
        "tokenize-unknown-model",
        "/tokenize",
        {"model": "nope", "prompt": "x"},
        404,
        "model_not_found",
        ["nope"],
    ),
    ("detokenize-negative", "/detokenize", {"model": "llama", "tokens": [-1]}, 400, None, ["tokens", ">= 0"]),
]


@pytest.mark.parametrize(
    "path, body, status, code, words",
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_requests_get_an_openai_error_that_says_what_to_fix(http, node, path, body, status, code, words):
    if isinstance(body, bytes):
        response = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        response = http.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    if code is not None:
        assert error["code"] == code
    for word in words:
        assert word in error["message"], error["message"]
    assert "Traceback" not in response.text
    assert not node.live  # nothing was queued
    ok = http.post("/v1/completions", json={"model": "llama", "prompt": "still there?", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_a_wrong_method_is_a_405_in_the_same_format(http):
    response = http.get("/v1/completions")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_the_official_client_raises_its_own_error_classes(client):
    with pytest.raises(openai.NotFoundError, match="gpt-9"):
        client.completions.create(model="gpt-9", prompt="x")
    with pytest.raises(openai.BadRequestError, match="max_model_len"):
        client.completions.create(model="qwen2", prompt=LONG_PROMPT)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="qwen2", messages=[])


def test_a_streaming_request_that_is_bad_fails_before_the_stream_starts(http):
    body = {"model": "llama", "prompt": LONG_PROMPT, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 400
        assert response.headers["content-type"] == "application/json"
        response.read()
    assert "max_model_len" in response.json()["error"]["message"]


def test_a_failed_node_refuses_requests_with_a_503(http, node):
    node.error = RuntimeError("instance colocated-0 died")  # what Node.instance_failed records
    try:
        refused = http.post("/v1/completions", json={"model": "llama", "prompt": "x"})
        assert refused.status_code == 503
        assert "colocated-0 died" in refused.json()["error"]["message"]
    finally:
        node.error = None
    assert http.post("/v1/completions", json={"model": "llama", "prompt": "x", "max_tokens": 1}).is_success


def test_without_a_live_node_the_api_is_unhealthy_and_says_why():
    with (
        ServerThread(build_app(ClusterBackend(MemoryStore()))) as server,
        httpx.Client(base_url=server.url) as http,
    ):
        health = http.get("/health")
        assert health.status_code == 503
        assert "no node is serving" in health.json()["error"]["message"]
        missing = http.post("/v1/completions", json={"model": "llama", "prompt": "x"})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


# -- auth --------------------------------------------------------------------------------------------


def test_an_api_key_guards_every_route_but_health(cluster):
    with (
        ServerThread(build_app(ClusterBackend(cluster.store), api_keys=[API_KEY, OTHER_KEY])) as server,
        httpx.Client(base_url=server.url, timeout=60) as http,
    ):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/tokenize")):
                response = http.request(method, path, headers=headers, json={"model": "llama", "prompt": "x"})
                assert response.status_code == 401, (path, headers)
                assert response.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/health").status_code == 200
        for key in (API_KEY, OTHER_KEY):  # every configured key works
            good = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
            assert (
                good.completions.create(model="llama", prompt="x", max_tokens=2).usage.completion_tokens >= 1
            )
        bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


# -- disconnects -------------------------------------------------------------------------------------

# Long enough (n * tokens) that the request is still running when the client hangs up.
LONG_REQUEST = {
    "model": "llama",
    "prompt": "Go",
    "max_tokens": 500,
    "n": 16,
    "ignore_eos": True,
    "temperature": 1,
}


IMPATIENT_S = 0.3


def _finished_ids(node: Node) -> set[str]:
    return {request.request_id for request in node.completed}


def test_a_client_that_leaves_mid_stream_aborts_its_request(http, node):
    with http.stream("POST", "/v1/completions", json=LONG_REQUEST | {"stream": True}) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        request_id = json.loads(first.removeprefix("data: "))["id"]
        assert request_id in node.live
    wait_idle(node)
    assert request_id not in _finished_ids(node)  # aborted, not run to the end


def test_a_client_that_times_out_aborts_its_request(server, node):
    finished_before = len(node.completed)
    with (
        httpx.Client(base_url=server.url, timeout=IMPATIENT_S) as impatient,
        pytest.raises(httpx.ReadTimeout),
    ):
        impatient.post("/v1/completions", json=LONG_REQUEST)
    wait_idle(node)
    assert len(node.completed) == finished_before  # aborted requests are not among the completed


def test_an_internal_error_is_a_500_without_the_traceback(cluster):
    app = build_app(ClusterBackend(cluster.store))

    async def broken() -> None:
        raise ZeroDivisionError("secret internals")

    app.add_api_route("/v1/broken", broken)  # a route of the real app that fails unexpectedly
    with ServerThread(app, log_level="critical") as server, httpx.Client(base_url=server.url) as http:
        response = http.get("/v1/broken")
        assert response.status_code == 500
        assert response.json()["error"]["type"] == "server_error"
        assert "secret" not in response.text and "Traceback" not in response.text
        assert http.get("/v1/models").status_code == 200


# -- the cluster: routing, records -------------------------------------------------------------------


def test_either_api_server_serves_a_request_with_the_same_output(cluster, model_dirs, tokenizers, hf_greedy):
    prompt = [5, 6, 7, 8]
    expected = expected_text(model_dirs, tokenizers, hf_greedy, "mistral", prompt)
    for server in cluster.api_servers:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
        answer = client.completions.create(model="mistral", prompt=prompt, max_tokens=TOKENS, **GREEDY)
        assert answer.choices[0].text == expected


def test_each_request_is_recorded_in_the_store_with_its_node_instance_and_tokens(cluster, client):
    answer = client.completions.create(model="qwen2", prompt="Record me", max_tokens=TOKENS, **GREEDY)
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    record = cluster.store.get_request(answer.id)
    while (record is None or record.state != RequestState.FINISHED) and time.monotonic() < deadline:
        time.sleep(POLL_S)
        record = cluster.store.get_request(answer.id)
    assert record is not None and record.state == RequestState.FINISHED
    assert record.model == "qwen2" and record.node_id == cluster.node_server.node_id
    assert record.instance_id == f"{cluster.node_server.node_id}/colocated-0"
    assert record.prompt_tokens == answer.usage.prompt_tokens
    assert record.output_tokens == answer.usage.completion_tokens == len(record.output_token_ids)
    assert record.arrival_s <= record.first_token_s <= record.finished_s
    assert record.finish_reason == "length"
