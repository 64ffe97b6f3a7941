"""Thousands of malformed and hostile requests against a real server: none may get a 5xx or break it.

A user (or an attacker) may send anything: wrong types, numbers far out of range, NaN, lone UTF-16
surrogates, deeply nested JSON, bytes that are not JSON, the wrong Content-Type, unknown models,
token ids outside the vocabulary, bodies over the size limit. Every one must get either a correct
answer or a 4xx in the OpenAI error format with a message, and afterwards the server must still
give exactly transformers' greedy tokens for a normal request, with nothing left running on the engine.

The server's limits (`ApiLimits`) keep every request that happens to be valid cheap: at most
`MAX_N` choices of `MAX_OUTPUT_TOKENS` tokens. The examples are derandomized, so CI runs the same
requests each time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aegaeon.config import MIB, ApiLimits, EngineConfig
from aegaeon.engine.engine import LLMEngine
from aegaeon.engine.tokenizer import Tokenizer
from aegaeon.serve.api_server import build_app
from aegaeon.serve.engine_backend import EngineBackend
from aegaeon.serve.protocol import CHAT_ROLES
from tests.serve.http_server import ServerThread

MODELS = ("llama", "qwen2")
KV_BYTES = 4 * MIB
MAX_N = 2
MAX_OUTPUT_TOKENS = 4
MAX_BODY_BYTES = 64 * 1024
LIMITS = ApiLimits(max_body_bytes=MAX_BODY_BYTES, max_n=MAX_N, max_output_tokens=MAX_OUTPUT_TOKENS)
REQUEST_TIMEOUT_S = 60
DRAIN_TIMEOUT_S = 20.0
POLL_S = 0.02

# Examples per property, one request each: 5,000 requests in all.
PLAUSIBLE_EXAMPLES = 1500
WILD_EXAMPLES = 1000
TOKENIZER_EXAMPLES = 1000
RAW_BODY_EXAMPLES = 1500

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
TOKENIZE = "/tokenize"
DETOKENIZE = "/detokenize"
ROUTES = (COMPLETIONS, CHAT, TOKENIZE, DETOKENIZE)
JSON_CONTENT_TYPE = "application/json"
SSE_CONTENT_TYPE = "text/event-stream"
ERROR_FIELDS = {"message", "type", "param", "code"}

FUZZ_SETTINGS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.large_base_example,
    ],
)


# -- the server ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dirs(five_model_dirs):
    return {name: five_model_dirs[name] for name in MODELS}


@pytest.fixture(scope="module")
def engine(model_dirs) -> LLMEngine:
    return LLMEngine(models=model_dirs, config=EngineConfig(kv_cache_bytes=KV_BYTES), progress=False)


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
def still_serving(http, backend, engine, model_dirs, hf_greedy) -> Callable[[], None]:
    """`still_serving()` asserts the server gives each model's greedy tokens and the engine is idle."""
    prompt = "The market at dawn"

    def check() -> None:
        for model in MODELS:
            tokenizer = Tokenizer.from_pretrained(model_dirs[model])
            prompt_ids = tokenizer.encode(prompt)
            expected = tokenizer.decode(hf_greedy(model_dirs[model], prompt_ids, MAX_OUTPUT_TOKENS))
            body = {"model": model, "prompt": prompt, "max_tokens": MAX_OUTPUT_TOKENS, "temperature": 0}
            response = http.post(COMPLETIONS, json=body | {"ignore_eos": True})
            assert response.status_code == 200, response.text
            answer = response.json()
            assert answer["choices"][0]["text"] == expected
            assert answer["usage"] == {
                "prompt_tokens": len(prompt_ids),
                "completion_tokens": MAX_OUTPUT_TOKENS,
                "total_tokens": len(prompt_ids) + MAX_OUTPUT_TOKENS,
            }
        assert backend.error is None
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while engine.has_unfinished_requests() and time.monotonic() < deadline:
            time.sleep(POLL_S)
        assert not engine.has_unfinished_requests()  # nothing a hostile request started is left running
        assert http.get("/health").json()["live_requests"] == 0

    return check


class Sent:
    """Counts the requests a property sent, so a test can show it sent what it claims."""

    def __init__(self) -> None:
        self.count = 0


# -- what every answer must look like -----------------------------------------------------------------


def check_answer(response: httpx.Response, route: str) -> None:
    """No 5xx; a 4xx is an OpenAI error with a message; a 200 is a well-formed answer within the limits."""
    status = response.status_code
    assert status < 500, f"{status}: {response.text[:2000]}"
    if status >= 400:
        assert response.headers["content-type"] == JSON_CONTENT_TYPE, response.headers
        body = response.json()
        assert set(body) == {"error"}, body
        error = body["error"]
        assert set(error) == ERROR_FIELDS, error
        assert isinstance(error["message"], str) and error["message"].strip(), error
        assert isinstance(error["type"], str) and error["type"], error
        assert error["param"] is None or isinstance(error["param"], str), error
        assert error["code"] is None or isinstance(error["code"], str), error
        return
    assert status == 200, response.text[:2000]
    if route == TOKENIZE:
        body = response.json()
        assert body["count"] == len(body["tokens"]) and all(isinstance(t, int) for t in body["tokens"])
    elif route == DETOKENIZE:
        assert isinstance(response.json()["prompt"], str)
    elif response.headers["content-type"].startswith(SSE_CONTENT_TYPE):
        check_stream(response.text)
    else:
        body = response.json()
        assert 1 <= len(body["choices"]) <= MAX_N
        assert body["usage"]["completion_tokens"] <= len(body["choices"]) * MAX_OUTPUT_TOKENS


def check_stream(text: str) -> None:
    """A 200 stream ends in [DONE] and carries no in-band error (the in-stream form of a 5xx)."""
    events = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", text[-2000:]
    for event in events[:-1]:
        chunk = json.loads(event)
        assert "error" not in chunk, chunk
        assert all(choice["index"] < MAX_N for choice in chunk["choices"])


def post_json(http: httpx.Client, route: str, body: Any, sent: Sent) -> httpx.Response:
    # Python's json writes NaN and Infinity, which its parser (and so the server's) reads back;
    # ensure_ascii writes a lone surrogate as its \\ud800 escape.
    content = json.dumps(body, allow_nan=True, ensure_ascii=True)
    sent.count += 1
    return http.post(route, content=content, headers={"Content-Type": JSON_CONTENT_TYPE})


# -- values -----------------------------------------------------------------------------------------

EDGE_INTS = (
    -1,
    0,
    2**31,
    2**32,
    2**63 - 1,
    2**63,
    2**64,
    -(2**63) - 1,
    10**30,
    -(10**30),
    10**4000,  # Python's json reads at most 4300 digits
)
EDGE_FLOATS = (-0.0, 5e-324, 1e-300, 1e308, -1e308, float("nan"), float("inf"), float("-inf"))
EDGE_STRINGS = (
    "",
    " ",
    "\x00",
    "\ud800",  # a lone high surrogate: JSON allows the escape, no tokenizer can encode it
    "a\udfffb",
    "\ufffd",
    "\U0001f600",
    "<|im_start|>",
    "{{ raise_exception('x') }}",
    "{% for x in range(10**9) %}",
    "1e5",
    "true",
    "null",
    "%s%n",
    "../../etc/passwd",
)
UNKNOWN_MODELS = ("gpt-4", "", "LLAMA", "llama ", "llama\x00", "../llama", "\ud800", "qwen2/../llama")
# Values just past this server's limits, and the boundaries of the fields' ranges.
BOUNDARY_VALUES = (MAX_N + 1, MAX_OUTPUT_TOKENS + 1, 0, -1, 21, 1.0000001, -2.0000001, 2.0000001)
# Token ids that both demo tokenizers know.
VOCAB = 900

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from(EDGE_INTS),
    st.floats(),
    st.sampled_from(EDGE_FLOATS),
    st.text(max_size=12),
    st.sampled_from(EDGE_STRINGS),
    st.sampled_from(BOUNDARY_VALUES),
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)


def giant_strings() -> st.SearchStrategy[str]:
    """Long strings, on both sides of the body limit; built by repetition, which is cheap to generate."""
    return st.builds(
        lambda unit, count: unit * count,
        st.sampled_from(["x", "word ", "\U0001f600", "\ud800", "<s>"]),
        st.integers(min_value=MAX_BODY_BYTES // 8, max_value=2 * MAX_BODY_BYTES),
    )


texts = st.one_of(st.text(max_size=40), st.sampled_from(EDGE_STRINGS))
token_ids = st.one_of(st.integers(min_value=-2, max_value=2000), st.sampled_from(EDGE_INTS))
models = st.one_of(st.sampled_from(MODELS), st.sampled_from(UNKNOWN_MODELS))
prompts = st.one_of(
    texts,
    st.lists(token_ids, max_size=12),
    st.lists(texts, min_size=1, max_size=3),
    st.lists(st.lists(token_ids, max_size=6), min_size=1, max_size=3),
    st.lists(st.integers(min_value=0, max_value=50), min_size=500, max_size=700),  # around the context
    giant_strings(),
)
content_parts = st.fixed_dictionaries(
    {"type": st.one_of(st.sampled_from(["text", "image_url", "input_audio", "refusal"]), json_values)},
    optional={"text": st.one_of(texts, json_values), "image_url": json_values},
)
messages = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(CHAT_ROLES + ("robot", "", "USER")), json_values)},
    optional={
        "content": st.one_of(texts, st.none(), st.lists(content_parts, max_size=3), json_values),
        "name": st.one_of(texts, json_values),
        "tool_calls": json_values,
        "tool_call_id": json_values,
    },
)
message_lists = st.one_of(st.lists(messages, max_size=4), json_values)
hostile = st.one_of(json_values, giant_strings(), prompts, message_lists)

# -- plausible requests: every field in range, then a few fields replaced by hostile values ------------

plausible_prompts = st.one_of(
    st.text(min_size=1, max_size=40),
    st.lists(st.integers(min_value=0, max_value=VOCAB - 1), min_size=1, max_size=12),
    st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=1),
    st.lists(st.integers(min_value=0, max_value=VOCAB - 1), min_size=505, max_size=515),  # the context's end
)
plausible_messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(CHAT_ROLES),
            "content": st.one_of(
                st.text(max_size=30),
                st.lists(
                    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=10)}), max_size=2
                ),
            ),
        },
        optional={"name": st.text(min_size=1, max_size=8)},
    ),
    min_size=1,
    max_size=3,
)
PLAUSIBLE_SAMPLING = {
    "n": st.integers(min_value=1, max_value=MAX_N),
    "max_tokens": st.one_of(st.none(), st.integers(min_value=1, max_value=MAX_OUTPUT_TOKENS)),
    "temperature": st.floats(min_value=0, max_value=2),
    "top_p": st.floats(min_value=0.01, max_value=1),
    "top_k": st.integers(min_value=-1, max_value=50),
    "min_p": st.floats(min_value=0, max_value=1),
    "presence_penalty": st.floats(min_value=-2, max_value=2),
    "frequency_penalty": st.floats(min_value=-2, max_value=2),
    "repetition_penalty": st.floats(min_value=0.1, max_value=3),
    "seed": st.integers(min_value=0, max_value=2**32),
    "stop": st.one_of(st.text(min_size=1, max_size=4), st.lists(st.text(min_size=1, max_size=4), max_size=3)),
    "stop_token_ids": st.lists(st.integers(min_value=0, max_value=VOCAB - 1), max_size=3),
    "logit_bias": st.dictionaries(st.integers(0, VOCAB - 1).map(str), st.floats(-100, 100), max_size=3),
    "ignore_eos": st.booleans(),
    "skip_special_tokens": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "user": st.text(max_size=10),
}
PLAUSIBLE_FIELDS = {
    COMPLETIONS: PLAUSIBLE_SAMPLING
    | {"logprobs": st.integers(min_value=0, max_value=5), "echo": st.just(False)},
    CHAT: PLAUSIBLE_SAMPLING
    | {
        "max_completion_tokens": st.integers(min_value=1, max_value=MAX_OUTPUT_TOKENS),
        "logprobs": st.booleans(),
        "top_logprobs": st.integers(min_value=0, max_value=5),
    },
}
PLAUSIBLE_REQUIRED = {
    COMPLETIONS: {"model": st.sampled_from(MODELS), "prompt": plausible_prompts},
    CHAT: {"model": st.sampled_from(MODELS), "messages": plausible_messages},
}
# Fields a hostile value may land in: the known ones, and some the API does not have.
HOSTILE_TARGETS = {
    route: [*PLAUSIBLE_REQUIRED[route], *PLAUSIBLE_FIELDS[route], "suffix", "best_of", "tools", "functions"]
    for route in (COMPLETIONS, CHAT)
}
MAX_HOSTILE_FIELDS = 2


@st.composite
def plausible_requests(draw: Callable) -> tuple[str, dict]:
    """A generation request in range, with up to MAX_HOSTILE_FIELDS fields replaced by hostile values."""
    route = draw(st.sampled_from((COMPLETIONS, CHAT)))
    body = draw(st.fixed_dictionaries(PLAUSIBLE_REQUIRED[route], optional=PLAUSIBLE_FIELDS[route]))
    targets = draw(
        st.lists(st.sampled_from(HOSTILE_TARGETS[route]), max_size=MAX_HOSTILE_FIELDS, unique=True)
    )
    for name in targets:
        body[name] = draw(hostile)
    return route, body


# -- wild requests: any field, any value, required fields sometimes missing -----------------------------


def either(valid: st.SearchStrategy) -> st.SearchStrategy:
    """A field's value: plausible, or anything at all."""
    return st.one_of(valid, json_values)


@st.composite
def without_some_keys(draw: Callable, bodies: st.SearchStrategy[dict]) -> dict:
    """A body as generated, or (one time in four) with some of its keys, required ones too, left out."""
    body = draw(bodies)
    if draw(st.integers(min_value=0, max_value=3)):
        return body
    return {key: value for key, value in body.items() if draw(st.booleans())}


WILD_FIELDS = {
    COMPLETIONS: {name: either(value) for name, value in PLAUSIBLE_FIELDS[COMPLETIONS].items()},
    CHAT: {name: either(value) for name, value in PLAUSIBLE_FIELDS[CHAT].items()},
}
wild_requests = st.one_of(
    st.tuples(
        st.just(COMPLETIONS),
        without_some_keys(
            st.fixed_dictionaries(
                {"model": either(models), "prompt": hostile}, optional=WILD_FIELDS[COMPLETIONS]
            )
        ),
    ),
    st.tuples(
        st.just(CHAT),
        without_some_keys(
            st.fixed_dictionaries(
                {"model": either(models), "messages": message_lists}, optional=WILD_FIELDS[CHAT]
            )
        ),
    ),
)
tokenizer_requests = st.one_of(
    st.tuples(
        st.just(TOKENIZE),
        without_some_keys(
            st.fixed_dictionaries(
                {"model": either(models)},
                optional={
                    "prompt": st.one_of(texts, giant_strings(), json_values),
                    "messages": st.one_of(plausible_messages, message_lists),
                    "add_special_tokens": either(st.booleans()),
                    "add_generation_prompt": either(st.booleans()),
                },
            )
        ),
    ),
    st.tuples(
        st.just(DETOKENIZE),
        without_some_keys(
            st.fixed_dictionaries(
                {"model": either(models), "tokens": either(st.lists(token_ids, max_size=12))}
            )
        ),
    ),
)

# A valid request per route, for the byte-level damage below.
VALID = {
    COMPLETIONS: {"model": "llama", "prompt": "The harbor", "max_tokens": 2, "temperature": 0},
    CHAT: {"model": "qwen2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
    TOKENIZE: {"model": "llama", "prompt": "The harbor"},
    DETOKENIZE: {"model": "qwen2", "tokens": [5, 6, 7]},
}


# -- bytes that are not a JSON request ---------------------------------------------------------------

CONTENT_TYPES = (
    None,  # none sent
    JSON_CONTENT_TYPE,
    "application/json; charset=utf-8",
    "application/json; charset=latin-1",
    "application/vnd.api+json",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/octet-stream",
    "json",
    ";;;",
)


def nested(depth: int, open_: str, close: str, inner: str = "1") -> bytes:
    return (open_ * depth + inner + close * depth).encode()


@st.composite
def raw_bodies(draw: Callable) -> bytes:
    """Bytes a JSON parser chokes on, or JSON that is not a request object."""
    route = draw(st.sampled_from(ROUTES))
    valid = json.dumps(VALID[route]).encode()
    kind = draw(st.integers(min_value=0, max_value=8))
    if kind == 0:
        return draw(st.binary(max_size=200))
    if kind == 1:  # a valid request cut short
        return valid[: draw(st.integers(min_value=0, max_value=len(valid) - 1))]
    if kind == 2:  # a valid request with bytes overwritten (invalid UTF-8 included)
        data = bytearray(valid)
        for _ in range(draw(st.integers(min_value=1, max_value=4))):
            data[draw(st.integers(min_value=0, max_value=len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == 3:  # nesting from harmless to past the parser's recursion limit
        depth = draw(st.sampled_from([10, 100, 900, 5000, 50000]))
        field = draw(st.sampled_from(["prompt", "messages", "tokens", "model", "n"]))
        opening, closing = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        return valid[:-1] + f', "{field}": '.encode() + nested(depth, opening, closing) + b"}"
    if kind == 4:  # numbers with more digits than Python's int parser accepts
        digits = draw(st.sampled_from([4300, 4301, 10000]))
        field = draw(st.sampled_from(["n", "max_tokens", "seed", "temperature", "tokens"]))
        return valid[:-1] + f', "{field}": {"9" * digits}'.encode() + b"}"
    if kind == 5:  # JSON, but not an object
        return json.dumps(draw(json_values), allow_nan=True).encode()
    if kind == 6:  # a string field holding raw (not escaped) invalid UTF-8
        junk = draw(
            st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80\x80"])
        )
        return valid[:-1] + b', "prompt": "' + junk + b'"}'
    if kind == 7:  # duplicated keys and trailing garbage
        return valid[:-1] + b', "model": "nope"}' + draw(st.sampled_from([b"", b"}", b" x", b"\x00"]))
    return draw(
        st.sampled_from([b"", b" ", b"null", b"{}", b"[]", b'"x"', b"NaN", b"{" * 3, b"\xef\xbb\xbf{}"])
    )


# -- the properties ----------------------------------------------------------------------------------


def fuzz_json(http: httpx.Client, requests: st.SearchStrategy[tuple[str, Any]], examples: int) -> int:
    """Send `examples` requests drawn from `requests`, checking each answer; how many were sent."""
    sent = Sent()

    @settings(max_examples=examples, **FUZZ_SETTINGS)
    @given(requests)
    def fuzz(request: tuple[str, Any]) -> None:
        route, body = request
        check_answer(post_json(http, route, body, sent), route)

    fuzz()
    return sent.count


def test_plausible_requests_with_hostile_fields_get_a_4xx_or_a_correct_answer(http, still_serving):
    assert fuzz_json(http, plausible_requests(), PLAUSIBLE_EXAMPLES) >= PLAUSIBLE_EXAMPLES
    still_serving()


def test_wild_generation_requests_get_a_4xx_or_a_correct_answer(http, still_serving):
    assert fuzz_json(http, wild_requests, WILD_EXAMPLES) >= WILD_EXAMPLES
    still_serving()


def test_hostile_tokenizer_requests_get_a_4xx_or_a_correct_answer(http, still_serving):
    assert fuzz_json(http, tokenizer_requests, TOKENIZER_EXAMPLES) >= TOKENIZER_EXAMPLES
    still_serving()


def test_damaged_bytes_and_wrong_content_types_get_a_4xx_or_a_correct_answer(http, still_serving):
    sent = Sent()
    content_types = st.one_of(st.just(JSON_CONTENT_TYPE), st.sampled_from(CONTENT_TYPES))

    @settings(max_examples=RAW_BODY_EXAMPLES, **FUZZ_SETTINGS)
    @given(st.sampled_from(ROUTES), raw_bodies(), content_types)
    def fuzz(route: str, body: bytes, content_type: str | None) -> None:
        headers = {"Content-Type": content_type} if content_type is not None else {}
        sent.count += 1
        check_answer(http.post(route, content=body, headers=headers), route)

    fuzz()
    assert sent.count >= RAW_BODY_EXAMPLES
    still_serving()
