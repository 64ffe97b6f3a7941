"""The api server's request limits (`ApiLimits`): each one refuses a request over it with a clear error.

A user over a limit gets a 4xx whose message names the limit and the field to change (the body gets a
413, the others a 400 with `param` set), and nothing is queued on the engine; a request exactly at each
limit is served. With no limits given, `build_app` applies `ApiLimits()`'s defaults.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from aegaeon.config import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_N, MIB, ApiLimits, EngineConfig
from aegaeon.engine.engine import LLMEngine
from aegaeon.serve.api_server import build_app
from aegaeon.serve.engine_backend import EngineBackend
from tests.serve.http_server import ServerThread

MODEL = "llama"
KV_BYTES = 4 * MIB
MAX_BODY_BYTES = 16 * 1024
MAX_N = 3
MAX_PROMPT_TOKENS = 32
MAX_OUTPUT_TOKENS = 8
LIMITS = ApiLimits(
    max_body_bytes=MAX_BODY_BYTES,
    max_n=MAX_N,
    max_prompt_tokens=MAX_PROMPT_TOKENS,
    max_output_tokens=MAX_OUTPUT_TOKENS,
)
REQUEST_TIMEOUT_S = 60
DRAIN_TIMEOUT_S = 20.0
POLL_S = 0.02
# Token ids every demo tokenizer knows.
SOME_TOKEN = 7
CHUNK_BYTES = 1024
GREEDY = {"temperature": 0, "ignore_eos": True}
MESSAGES = [{"role": "user", "content": "Name a river."}]


@pytest.fixture(scope="module")
def engine(five_model_dirs) -> LLMEngine:
    config = EngineConfig(kv_cache_bytes=KV_BYTES)
    return LLMEngine(models={MODEL: five_model_dirs[MODEL]}, config=config, progress=False)


@pytest.fixture(scope="module")
def backend(engine):
    backend = EngineBackend(engine)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def server(backend):
    with ServerThread(build_app(backend, limits=LIMITS)) as server:
        yield server


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT_S) as http:
        yield http


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def assert_refused(response: httpx.Response, status: int, param: str | None, words: list[str]) -> dict:
    """An OpenAI-format error with `status` and `param`, whose message holds each of `words`."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    for word in words:
        assert word in error["message"], error["message"]
    return error


def assert_nothing_running(engine: LLMEngine) -> None:
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(POLL_S)
    assert not engine.has_unfinished_requests()


def body_of_size(size: int) -> bytes:
    """A valid completion request of exactly `size` bytes (padded in `user`, which the API ignores)."""
    request = {"model": MODEL, "prompt": "Pad", "max_tokens": 2, **GREEDY, "user": ""}
    padding = size - len(json.dumps(request).encode())
    assert padding >= 0
    body = json.dumps(request | {"user": "u" * padding}).encode()
    assert len(body) == size
    return body


def chunked(body: bytes) -> Iterator[bytes]:
    """`body` as an iterator: httpx sends it chunked, without a Content-Length."""
    for start in range(0, len(body), CHUNK_BYTES):
        yield body[start : start + CHUNK_BYTES]


# -- body bytes ----------------------------------------------------------------------------------------


def test_a_body_over_max_body_bytes_is_a_413_naming_the_limit(http, engine):
    response = http.post(
        "/v1/completions",
        content=body_of_size(MAX_BODY_BYTES + 1),
        headers={"Content-Type": "application/json"},
    )
    error = assert_refused(
        response, 413, None, ["max_body_bytes", str(MAX_BODY_BYTES), str(MAX_BODY_BYTES + 1)]
    )
    assert error["code"] == "request_too_large"
    assert_nothing_running(engine)


def test_a_chunked_body_over_max_body_bytes_is_a_413_once_it_passes_the_limit(http, engine):
    response = http.post(
        "/v1/completions",
        content=chunked(body_of_size(MAX_BODY_BYTES + 1)),
        headers={"Content-Type": "application/json"},
    )
    assert "content-length" not in response.request.headers
    error = assert_refused(response, 413, None, ["max_body_bytes", str(MAX_BODY_BYTES)])
    assert error["code"] == "request_too_large"
    assert_nothing_running(engine)


@pytest.mark.parametrize("send", [bytes, chunked], ids=["content-length", "chunked"])
def test_a_body_of_exactly_max_body_bytes_is_served(http, send):
    response = http.post(
        "/v1/completions",
        content=send(body_of_size(MAX_BODY_BYTES)),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2


def test_the_openai_client_sees_a_413_as_a_status_error(client):
    with pytest.raises(openai.APIStatusError, match="max_body_bytes") as raised:
        client.completions.create(model=MODEL, prompt="x" * MAX_BODY_BYTES, max_tokens=1)
    assert raised.value.status_code == 413


# -- n -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, body",
    [("/v1/completions", {"prompt": "Go"}), ("/v1/chat/completions", {"messages": MESSAGES})],
    ids=["completions", "chat"],
)
def test_n_over_max_n_is_a_400_naming_n_and_max_n(http, engine, path, body):
    request = {"model": MODEL, "max_tokens": 1, **body}
    response = http.post(path, json=request | {"n": MAX_N + 1})
    assert_refused(response, 400, "n", ["max_n", f"n is {MAX_N + 1}", str(MAX_N)])
    at_limit = http.post(path, json=request | {"n": MAX_N})
    assert at_limit.status_code == 200, at_limit.text
    assert [choice["index"] for choice in at_limit.json()["choices"]] == list(range(MAX_N))
    assert_nothing_running(engine)


def test_a_streaming_request_over_a_limit_gets_a_plain_400_not_a_stream(http):
    body = {"model": MODEL, "prompt": "Go", "n": MAX_N + 1, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        response.read()
    assert response.headers["content-type"] == "application/json"
    assert_refused(response, 400, "n", ["max_n"])


def test_the_openai_client_raises_bad_request_over_max_n(client):
    with pytest.raises(openai.BadRequestError, match="max_n"):
        client.completions.create(model=MODEL, prompt="Go", n=MAX_N + 1, max_tokens=1)


# -- output tokens -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, body, field",
    [
        ("/v1/completions", {"prompt": "Go"}, "max_tokens"),
        ("/v1/chat/completions", {"messages": MESSAGES}, "max_tokens"),
        ("/v1/chat/completions", {"messages": MESSAGES}, "max_completion_tokens"),
    ],
    ids=["completions", "chat-max_tokens", "chat-max_completion_tokens"],
)
def test_a_length_over_max_output_tokens_is_a_400_naming_the_field(http, engine, path, body, field):
    request = {"model": MODEL, **GREEDY, **body}
    response = http.post(path, json=request | {field: MAX_OUTPUT_TOKENS + 1})
    assert_refused(
        response,
        400,
        field,
        ["max_output_tokens", f"{field} is {MAX_OUTPUT_TOKENS + 1}", str(MAX_OUTPUT_TOKENS)],
    )
    at_limit = http.post(path, json=request | {field: MAX_OUTPUT_TOKENS})
    assert at_limit.status_code == 200, at_limit.text
    assert at_limit.json()["usage"]["completion_tokens"] == MAX_OUTPUT_TOKENS
    assert_nothing_running(engine)


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/chat/completions", {"messages": MESSAGES}),  # chat's default: until the context is full
        ("/v1/completions", {"prompt": "Go", "max_tokens": None}),  # an explicit null means the same
    ],
    ids=["chat-without-a-length", "completion-with-null"],
)
def test_a_request_without_a_length_stops_at_max_output_tokens(http, path, body):
    response = http.post(path, json={"model": MODEL, **GREEDY, **body})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == MAX_OUTPUT_TOKENS
    assert response.json()["choices"][0]["finish_reason"] == "length"


# -- prompt tokens -------------------------------------------------------------------------------------


def test_a_prompt_over_max_prompt_tokens_is_a_400_naming_the_prompt(http, engine):
    request = {"model": MODEL, "max_tokens": 1}
    response = http.post("/v1/completions", json=request | {"prompt": [SOME_TOKEN] * (MAX_PROMPT_TOKENS + 1)})
    error = assert_refused(
        response,
        400,
        "prompt",
        ["max_prompt_tokens", f"{MAX_PROMPT_TOKENS + 1} tokens", str(MAX_PROMPT_TOKENS)],
    )
    assert error["code"] == "context_length_exceeded"
    at_limit = http.post("/v1/completions", json=request | {"prompt": [SOME_TOKEN] * MAX_PROMPT_TOKENS})
    assert at_limit.status_code == 200, at_limit.text
    assert at_limit.json()["usage"]["prompt_tokens"] == MAX_PROMPT_TOKENS
    assert_nothing_running(engine)


def test_chat_messages_over_max_prompt_tokens_are_a_400_naming_the_messages(http):
    long = [{"role": "user", "content": "word " * MAX_PROMPT_TOKENS}]
    response = http.post("/v1/chat/completions", json={"model": MODEL, "messages": long, "max_tokens": 1})
    assert_refused(response, 400, "messages", ["max_prompt_tokens", str(MAX_PROMPT_TOKENS)])


def test_tokenize_is_not_limited_by_max_prompt_tokens(http):
    # /tokenize is how a client measures a prompt against the limit, so it must count past it.
    response = http.post("/tokenize", json={"model": MODEL, "prompt": "word " * MAX_PROMPT_TOKENS})
    assert response.status_code == 200 and response.json()["count"] > MAX_PROMPT_TOKENS


# -- defaults --------------------------------------------------------------------------------------------


def test_without_limits_build_app_applies_the_defaults(backend, engine):
    with (
        ServerThread(build_app(backend)) as server,
        httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT_S) as http,
    ):
        request = {"model": MODEL, "prompt": "Go", "max_tokens": 1}
        assert_refused(
            http.post("/v1/completions", json=request | {"n": DEFAULT_MAX_N + 1}), 400, "n", ["max_n"]
        )
        at_limit = http.post("/v1/completions", json=request | {"n": DEFAULT_MAX_N})
        assert at_limit.status_code == 200 and len(at_limit.json()["choices"]) == DEFAULT_MAX_N
        too_large = http.post(
            "/v1/completions",
            content=body_of_size(DEFAULT_MAX_BODY_BYTES + 1),
            headers={"Content-Type": "application/json"},
        )
        assert_refused(too_large, 413, None, ["max_body_bytes", str(DEFAULT_MAX_BODY_BYTES)])
        # No output cap by default: a request may run to the end of the context.
        long = http.post("/v1/completions", json=request | {"max_tokens": 100, **GREEDY})
        assert long.status_code == 200 and long.json()["usage"]["completion_tokens"] == 100
    assert_nothing_running(engine)


@pytest.mark.parametrize(
    "settings",
    [
        {"max_body_bytes": 0},
        {"max_n": 0},
        {"max_prompt_tokens": 0},
        {"max_output_tokens": -1},
        {"max_n": None},
    ],
)
def test_a_limit_below_one_is_refused_when_configured(settings):
    [name] = settings
    with pytest.raises(ValueError, match=name):
        ApiLimits(**settings)
