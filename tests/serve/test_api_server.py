"""The OpenAI-compatible HTTP API, in process: a real engine, a real uvicorn server, the official client.

A user sees: three models behind one endpoint; completions and chat, streamed or not, give exactly
transformers' greedy tokens; usage counts are right; bad requests get an OpenAI-format error that
says what to fix, and the server keeps serving; an unexpected failure is a 500 naming a request id;
a slow tokenizer on one request holds up no other.

The app runs over `EngineBackend` (the models of one engine in this process), so these tests start no
node process; the same app over real nodes and a metadata store is tested in test_api_cluster.py.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from aegaeon.engine.tokenizer import Tokenizer
from aegaeon.serve.api_server import build_app
from aegaeon.serve.engine_backend import EngineBackend
from aegaeon.serve.streaming import sse_event
from tests.serve.api_checks import (
    GREEDY,
    MESSAGES,
    MODELS,
    TOKENS,
    check_concurrent_requests,
    check_model_list,
    expected_text,
    sse_events,
)
from tests.serve.http_server import ServerThread

API_KEY = "test-key-0123"
OTHER_KEY = "test-key-4567"
DRAIN_TIMEOUT_S = 20.0
POLL_S = 0.02


@pytest.fixture(scope="module")
def model_dirs(five_model_dirs):
    return {name: five_model_dirs[name] for name in MODELS}


@pytest.fixture(scope="module")
def server(backend) -> ServerThread:
    with ServerThread(build_app(backend)) as server:
        yield server


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http


def live_requests(http: httpx.Client) -> int:
    return http.get("/health").json()["live_requests"]


def wait_idle(http: httpx.Client) -> None:
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while live_requests(http) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    assert live_requests(http) == 0


# -- models, health, tokenizer tools -----------------------------------------------------------------


def test_models_are_listed_with_their_context(client, http, engine):
    check_model_list(client, http, [engine.models[name].max_model_len for name in MODELS])


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


def test_completions_default_to_16_tokens_and_chat_to_the_context(client, engine):
    completion = client.completions.create(model="mistral", prompt="Once", **GREEDY)
    assert completion.usage.completion_tokens == 16
    chat = client.chat.completions.create(model="mistral", messages=MESSAGES, **GREEDY)
    assert chat.usage.total_tokens == engine.models["mistral"].max_model_len
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


def test_concurrent_streaming_and_plain_requests_agree(client, http, model_dirs, tokenizers, hf_greedy):
    check_concurrent_requests(client, model_dirs, tokenizers, hf_greedy)
    wait_idle(http)


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
        ["max_tokens", "greater than or equal to 0"],
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
        "prompt-list-of-lists-of-lists",
        "/v1/completions",
        {"model": "llama", "prompt": [[[1]]]},
        400,
        None,
        ["prompt", "list"],
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
    ("suffix", "/v1/completions", {"model": "llama", "prompt": "x", "suffix": "y"}, 400, None, ["suffix"]),
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
def test_bad_requests_get_an_openai_error_that_says_what_to_fix(http, path, body, status, code, words):
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
    assert live_requests(http) == 0  # nothing was queued
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


# -- auth --------------------------------------------------------------------------------------------


def test_an_api_key_guards_every_route_but_health(backend):
    with (
        ServerThread(build_app(backend, api_keys=[API_KEY, OTHER_KEY])) as server,
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


# -- failures of ours --------------------------------------------------------------------------------


class FailingBackend:
    """The in-process backend with a bug injected: generate raises `error` (a test double for a fault)."""

    def __init__(self, backend: EngineBackend, error: Exception):
        self.backend = backend
        self.error = error

    def __getattr__(self, name: str):
        return getattr(self.backend, name)

    async def generate(self, *args, **kwargs):
        raise self.error


def assert_internal_error(response: httpx.Response, caplog: pytest.LogCaptureFixture, secret: str) -> None:
    """A 500 naming a request id (header and message), whose traceback is logged under that id."""
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert error["type"] == "server_error"
    request_id = response.headers["x-request-id"]
    assert request_id in error["message"]
    assert secret not in response.text and "Traceback" not in response.text
    logged = [r for r in caplog.records if r.levelno == logging.ERROR and request_id in r.getMessage()]
    assert logged and logged[0].exc_info is not None and secret in str(logged[0].exc_info[1])


def test_a_stray_key_error_is_a_500_with_a_request_id_not_a_404(backend, caplog):
    app = build_app(FailingBackend(backend, KeyError("secret internals")))
    with ServerThread(app, log_level="critical") as server, httpx.Client(base_url=server.url) as http:
        for stream in (False, True):
            body = {"model": "llama", "prompt": "x", "max_tokens": 2, "stream": stream}
            assert_internal_error(http.post("/v1/completions", json=body), caplog, "secret")
        assert (
            http.post("/v1/chat/completions", json={"model": "llama", "messages": MESSAGES}).status_code
            == 500
        )
        assert http.get("/v1/models").status_code == 200  # the server keeps serving


class BreaksAfterFirstOutput:
    """A request's real stream that raises a bare KeyError after its first output (a fault injected)."""

    def __init__(self, stream):
        self.stream = stream
        self.request_id = stream.request_id
        self.outputs = 0

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.outputs:
            raise KeyError("secret internals")
        self.outputs += 1
        return await self.stream.__anext__()

    def close(self) -> None:
        self.stream.close()


class MidStreamFailureBackend(FailingBackend):
    async def generate(self, *args, **kwargs):
        return BreaksAfterFirstOutput(await self.backend.generate(*args, **kwargs))


def test_a_stray_key_error_mid_stream_is_an_in_band_500_naming_the_request(backend, engine, caplog):
    app = build_app(MidStreamFailureBackend(backend, KeyError()))
    body = {"model": "llama", "prompt": "x", "max_tokens": 8, "stream": True, "ignore_eos": True}
    with (
        ServerThread(app, log_level="critical") as server,
        httpx.Client(base_url=server.url) as http,
        http.stream("POST", "/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        events = sse_events(response.iter_lines())
    *chunks, failure, done = events
    assert done == "[DONE]" and chunks and all("error" not in chunk for chunk in chunks)
    request_id = chunks[0]["id"]
    assert failure["error"]["type"] == "server_error" and request_id in failure["error"]["message"]
    assert "secret" not in json.dumps(failure)
    assert any(request_id in r.getMessage() and r.exc_info for r in caplog.records)
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(POLL_S)
    assert not engine.has_unfinished_requests()  # the failed request was aborted, not left running


def test_an_internal_error_in_a_route_is_a_500_with_a_request_id(backend, caplog):
    app = build_app(backend)

    async def broken() -> None:
        raise ZeroDivisionError("secret internals")

    app.add_api_route("/v1/broken", broken)  # a route of the real app that fails unexpectedly
    with ServerThread(app, log_level="critical") as server, httpx.Client(base_url=server.url) as http:
        assert_internal_error(http.get("/v1/broken"), caplog, "secret")
        assert http.get("/v1/models").status_code == 200


# -- the event loop stays free ----------------------------------------------------------------------

GATE_TIMEOUT_S = 60.0
# Far below GATE_TIMEOUT_S: a request the held tokenizer delayed would time out.
PROMPT_ANSWER_TIMEOUT_S = 20.0


class HeldTokenizer:
    """A model's real tokenizer whose `encode` waits until the test lets it go (a slow tokenizer)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.entered = threading.Event()
        self.released = threading.Event()

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)

    def encode(self, *args, **kwargs) -> list[int]:
        self.entered.set()
        self.released.wait(GATE_TIMEOUT_S)
        return self.tokenizer.encode(*args, **kwargs)


class SlowTokenizerBackend:
    """The in-process backend whose tokenizer of one model is slow."""

    def __init__(self, backend: EngineBackend, model: str, tokenizer: HeldTokenizer):
        self.backend = backend
        self.slow_model = model
        self.held = tokenizer

    def __getattr__(self, name: str):
        return getattr(self.backend, name)

    async def tokenizer(self, name: str):
        return self.held if name == self.slow_model else await self.backend.tokenizer(name)


def test_a_slow_tokenizer_holds_up_neither_health_nor_another_models_stream(backend, engine):
    held = HeldTokenizer(engine.models["llama"].tokenizer)
    app = build_app(SlowTokenizerBackend(backend, "llama", held))
    with (
        ServerThread(app) as server,
        httpx.Client(base_url=server.url, timeout=PROMPT_ANSWER_TIMEOUT_S) as http,
        ThreadPoolExecutor(1) as pool,
    ):
        slow_body = {"model": "llama", "prompt": "A long document", "max_tokens": 2}
        slow = pool.submit(http.post, "/v1/completions", json=slow_body, timeout=GATE_TIMEOUT_S * 2)
        try:
            assert held.entered.wait(PROMPT_ANSWER_TIMEOUT_S)
            assert http.get("/health").json()["status"] == "ok"
            body = {"model": "qwen2", "prompt": "Hi", "max_tokens": 3, "stream": True, "ignore_eos": True}
            with http.stream("POST", "/v1/completions", json=body) as response:
                events = sse_events(response.iter_lines())
            assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
            assert not slow.done()  # all of that while the slow request was still tokenizing
        finally:
            held.released.set()
        assert slow.result().status_code == 200
