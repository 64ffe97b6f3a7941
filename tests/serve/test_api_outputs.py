"""Structured outputs, tools and the completions extras, through the official `openai` client.

The demo models have random weights, so what they write means nothing: the grammar is what makes a
reply valid, and the tests check exactly that (the reply parses and validates against its schema,
the tool call's arguments against the function's parameters). Echoed prompt logprobs are checked
against transformers' log-softmax of the same prompt. Every test bounds max_tokens: a random model
may write until the limit.
"""

from __future__ import annotations

import json
import shutil

import jsonschema
import openai
import pytest
import torch

from aegaeon.serve.api_server import build_app
from aegaeon.serve.protocol import UNSUPPORTED_CHAT_FIELDS, UNSUPPORTED_COMPLETION_FIELDS, UNSUPPORTED_FIELDS
from tests.serve.api_checks import GREEDY, MESSAGES
from tests.serve.http_server import ServerThread

# A template that tells the model about tools and renders tool calls and results, as Qwen's does.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:\n{% for tool in tools %}{{ tool.function.name }}: "
    "{{ tool.function.parameters | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}"
    "{% for call in message.tool_calls or [] %}<tool_call>\n{{ call.function | tojson }}\n</tool_call>"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "member", "color"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 5}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
PARAMETERS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER, TIME)}
SEEDS = 20
MAX_TOKENS = 64
TOOL_MAX_TOKENS = 128
LOGPROB_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def model_dirs(five_model_dirs, tmp_path_factory):
    """Llama, and a Qwen2 whose chat template renders tools."""
    tools_dir = tmp_path_factory.mktemp("qwen2-tools") / "model"
    shutil.copytree(five_model_dirs["qwen2"], tools_dir)
    config_path = tools_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = TOOLS_TEMPLATE
    config_path.write_text(json.dumps(config))
    (tools_dir / "chat_template.jinja").unlink(missing_ok=True)
    return {"llama": five_model_dirs["llama"], "qwen2": tools_dir}


@pytest.fixture(scope="module")
def client(backend) -> openai.OpenAI:
    with ServerThread(build_app(backend)) as server:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


# -- structured outputs ------------------------------------------------------------------------------


def test_json_schema_replies_validate_for_every_seed(client):
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": True},
    }
    for seed in range(SEEDS):
        reply = client.chat.completions.create(
            model="llama",
            messages=MESSAGES,
            response_format=response_format,
            seed=seed,
            temperature=1.0,
            max_completion_tokens=MAX_TOKENS,
        )
        [choice] = reply.choices
        assert choice.finish_reason == "stop", (seed, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_object_reply_is_a_json_object(client, tokenizers):
    reply = client.chat.completions.create(
        model="llama",
        messages=MESSAGES,
        response_format={"type": "json_object"},
        seed=3,
        max_completion_tokens=MAX_TOKENS,
        # Favouring the closing brace lets a random model finish its object within the limit.
        logit_bias={str(single_token(tokenizers, "llama", "}")): 5},
    )
    [choice] = reply.choices
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(json.loads(choice.message.content), dict)


def single_token(tokenizers, model: str, text: str) -> int:
    [token] = tokenizers[model].encode(text)
    return token


def test_vllm_guided_fields_constrain_completions(client):
    choice = client.completions.create(
        model="llama",
        prompt="Pick one:",
        max_tokens=MAX_TOKENS,
        seed=1,
        extra_body={"guided_choice": ["yes", "no", "maybe so"]},
    ).choices[0]
    assert choice.text in ("yes", "no", "maybe so") and choice.finish_reason == "stop"
    regex = client.completions.create(
        model="llama",
        prompt="A date:",
        max_tokens=MAX_TOKENS,
        seed=2,
        extra_body={"guided_regex": r"20[0-9]{2}-[01][0-9]"},
    ).choices[0]
    assert len(regex.text) == 7 and regex.text[:2] == "20" and regex.text[4] == "-", regex.text
    newer = client.completions.create(
        model="llama",
        prompt="JSON:",
        max_tokens=MAX_TOKENS,
        seed=4,
        extra_body={"structured_outputs": {"json": PERSON}},
    ).choices[0]
    jsonschema.validate(json.loads(newer.text), PERSON)


def test_constrained_and_free_requests_share_a_batch(client):
    """A greedy unconstrained request gives the same text alone and beside a constrained one."""
    kwargs = dict(model="llama", prompt="The river", max_tokens=12, **GREEDY)
    alone = client.completions.create(**kwargs).choices[0].text
    batch = client.completions.create(
        model="llama", prompt="The river", max_tokens=12, n=2, temperature=0, extra_body={"ignore_eos": True}
    )
    assert [c.text for c in batch.choices] == [alone, alone]
    constrained = client.completions.create(
        model="llama",
        prompt="The river",
        max_tokens=12,
        temperature=0,
        extra_body={"guided_choice": ["a", "b"]},
    )
    assert constrained.choices[0].text in ("a", "b")


@pytest.mark.parametrize(
    "body, param",
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "objekt"}},
                }
            },
            "response_format.json_schema",
        ),
        ({"guided_regex": "a(b"}, "guided_regex"),
        ({"guided_grammar": "start: nothing_defined"}, "guided_grammar"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_choice": ["a"], "guided_regex": "b"}, "guided_choice"),
    ],
)
def test_a_grammar_the_library_rejects_is_a_400_naming_the_field(client, body, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="llama", messages=MESSAGES, max_completion_tokens=4, extra_body=body
        )
    assert caught.value.body["param"] == param, caught.value.body


# -- tools -------------------------------------------------------------------------------------------


def _check_calls(calls, names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


def _streamed_calls(stream) -> tuple[list[dict], str | None]:
    """Tool calls put together from streamed deltas the way OpenAI's clients do."""
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = delta.id or call["id"]
                if delta.function is not None:
                    call["name"] += delta.function.name or ""
                    call["arguments"] += delta.function.arguments or ""
    return [calls[index] for index in sorted(calls)], finish


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
@pytest.mark.parametrize("model", ["llama", "qwen2"])
def test_forced_tool_calls_validate_streamed_and_not(client, model, tool_choice):
    names = {"get_weather", "get_time"} if tool_choice == "required" else {"get_time"}
    kwargs = dict(
        model=model,
        messages=MESSAGES,
        tools=[WEATHER, TIME],
        tool_choice=tool_choice,
        # A random model may go on calling: one call per reply keeps the reply within its limit.
        parallel_tool_calls=False,
        seed=7,
        max_completion_tokens=TOOL_MAX_TOKENS,
    )
    reply = client.chat.completions.create(**kwargs)
    [choice] = reply.choices
    assert choice.finish_reason == "tool_calls", choice.message.content
    _check_calls(choice.message.tool_calls, names)

    calls, finish = _streamed_calls(client.chat.completions.create(stream=True, **kwargs))
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c.function.name, c.function.arguments) for c in choice.message.tool_calls
    ]
    for call in calls:
        assert call["id"].startswith("call_")


def test_tools_and_a_tool_message_render_through_the_chat_template(client, tokenizers):
    conversation = [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 1}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Rain, 4 degrees."},
    ]
    reply = client.chat.completions.create(
        model="qwen2", messages=conversation, tools=[WEATHER], max_completion_tokens=2, **GREEDY
    )
    rendered = [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Oslo", "days": 1}},
                }
            ],
        },
        {"role": "tool", "content": "Rain, 4 degrees.", "tool_call_id": "call_1"},
    ]
    expected = tokenizers["qwen2"].apply_chat_template(rendered, tools=[WEATHER])
    assert reply.usage.prompt_tokens == len(expected)
    text = tokenizers["qwen2"].decode(expected)
    assert "get_weather" in text and "Rain, 4 degrees." in text and '"Oslo"' in text
    without_tools = client.chat.completions.create(
        model="qwen2",
        messages=conversation,
        tools=[WEATHER],
        tool_choice="none",
        max_completion_tokens=2,
        **GREEDY,
    )
    assert without_tools.usage.prompt_tokens < reply.usage.prompt_tokens


# -- completions: echo, several prompts, min_tokens, logit_bias, prompt logprobs ------------------------


def test_echo_with_max_tokens_0_gives_transformers_prompt_logprobs(
    client, tokenizers, model_dirs, hf_causal_lm
):
    prompt = "The captain studied the charts by the light of a lantern."
    ids = tokenizers["llama"].encode(prompt)
    reply = client.completions.create(
        model="llama", prompt=prompt, echo=True, logprobs=2, max_tokens=0, extra_body={"prompt_logprobs": 1}
    )
    [choice] = reply.choices
    assert choice.text == prompt and choice.finish_reason == "length"
    assert reply.usage.completion_tokens == 0 and reply.usage.prompt_tokens == len(ids)
    with torch.no_grad():
        logits = hf_causal_lm(model_dirs["llama"])(torch.tensor([ids])).logits[0].float()
    expected = logits.log_softmax(dim=-1)[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
    lps = choice.logprobs
    assert lps.tokens == [tokenizers["llama"].token_text(t) for t in ids]
    assert lps.token_logprobs[0] is None and lps.top_logprobs[0] is None
    assert torch.allclose(torch.tensor(lps.token_logprobs[1:]), expected, atol=LOGPROB_TOLERANCE)
    # Two tokens may read the same (the legacy shape is keyed by text): 1 or 2 entries, the best first.
    assert all(1 <= len(top) <= 2 for top in lps.top_logprobs[1:])
    best = logits.log_softmax(dim=-1)[:-1].max(dim=-1).values
    assert torch.allclose(
        torch.tensor([max(top.values()) for top in lps.top_logprobs[1:]]), best, atol=LOGPROB_TOLERANCE
    )
    vllm_style = choice.model_extra["prompt_logprobs"]
    assert vllm_style[0] is None and len(vllm_style) == len(ids)
    got = [entry[str(token)]["logprob"] for entry, token in zip(vllm_style[1:], ids[1:], strict=True)]
    assert torch.allclose(torch.tensor(got), expected, atol=LOGPROB_TOLERANCE)


def test_echo_streams_the_prompt_first(client):
    prompt = "Bread and honey"
    chunks = list(
        client.completions.create(
            model="llama", prompt=prompt, echo=True, max_tokens=4, stream=True, **GREEDY
        )
    )
    whole = client.completions.create(model="llama", prompt=prompt, echo=True, max_tokens=4, **GREEDY)
    assert chunks[0].choices[0].text.startswith(prompt)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text


@pytest.mark.parametrize("stream", [False, True])
def test_four_prompts_equal_four_requests(client, tokenizers, stream):
    prompts = [
        "The market at dawn",
        "Music is made",
        tokenizers["llama"].encode("Servers answer"),
        "Cities grow",
    ]
    singles = [
        client.completions.create(
            model="llama", prompt=p, max_tokens=6, n=2, seed=11, temperature=0.8
        ).choices
        for p in prompts
    ]
    expected = {p * 2 + c.index: c.text for p, choices in enumerate(singles) for c in choices}
    if stream:
        got: dict[int, str] = {}
        for chunk in client.completions.create(
            model="llama", prompt=prompts, max_tokens=6, n=2, seed=11, temperature=0.8, stream=True
        ):
            for choice in chunk.choices:
                got[choice.index] = got.get(choice.index, "") + choice.text
    else:
        reply = client.completions.create(
            model="llama", prompt=prompts, max_tokens=6, n=2, seed=11, temperature=0.8
        )
        assert [c.index for c in reply.choices] == list(range(8))
        got = {c.index: c.text for c in reply.choices}
    assert got == expected


def test_min_tokens_holds_back_a_stop_token(client, tokenizers):
    first = client.completions.create(
        model="llama", prompt="Gardening", max_tokens=1, temperature=0, logprobs=0
    )
    [token_id] = tokenizers["llama"].encode(first.choices[0].text)
    stopped = client.completions.create(
        model="llama",
        prompt="Gardening",
        max_tokens=8,
        temperature=0,
        extra_body={"stop_token_ids": [token_id]},
    )
    assert stopped.usage.completion_tokens == 1
    held = client.completions.create(
        model="llama",
        prompt="Gardening",
        max_tokens=8,
        temperature=0,
        extra_body={"stop_token_ids": [token_id], "min_tokens": 4},
    )
    assert held.usage.completion_tokens >= 4


def test_logit_bias_takes_over_greedy_choice(client, tokenizers):
    token = single_token(tokenizers, "llama", " the")
    reply = client.completions.create(
        model="llama", prompt="The", max_tokens=3, logit_bias={str(token): 100}, **GREEDY
    )
    assert reply.choices[0].text == " the" * 3
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="llama", prompt="The", max_tokens=3, logit_bias={"99999999": 1})
    assert caught.value.body["param"] == "logit_bias"


# -- the rule: honoured or refused -------------------------------------------------------------------

# A value each unsupported field would change the reply with.
UNSUPPORTED_VALUES = {
    "best_of": 2,
    "suffix": "end",
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "x"},
    "functions": [{"name": "f", "parameters": {}}],
    "function_call": "auto",
    "reasoning_effort": "high",
    "verbosity": "low",
    "web_search_options": {},
    "use_beam_search": True,
    "length_penalty": 0.5,
    "allowed_token_ids": [1, 2],
    "bad_words": ["river"],
    "truncate_prompt_tokens": 4,
    "spaces_between_special_tokens": False,
    "logits_processors": ["x"],
    "return_tokens_as_token_ids": True,
    "return_token_ids": True,
    "guided_whitespace_pattern": " ",
    "chat_template": "{{ messages }}",
    "chat_template_kwargs": {"enable_thinking": True},
    "continue_final_message": True,
    "documents": [{"text": "x"}],
    "mm_processor_kwargs": {"a": 1},
    "thinking_token_budget": 5,
    "vllm_xargs": {"a": 1},
    "add_special_tokens": False,
    "echo": True,
    "add_generation_prompt": False,
    "prompt_logprobs": 1,
}
CASES = [("completions", name) for name in UNSUPPORTED_FIELDS | UNSUPPORTED_COMPLETION_FIELDS] + [
    ("chat", name) for name in UNSUPPORTED_FIELDS | UNSUPPORTED_CHAT_FIELDS
]


@pytest.mark.parametrize("route, field", CASES, ids=[f"{route}-{field}" for route, field in CASES])
def test_unsupported_fields_are_a_400_naming_them(client, route, field):
    extra = {
        field: UNSUPPORTED_VALUES[field if not (route == "chat" and field == "add_special_tokens") else field]
    }
    if route == "chat" and field == "add_special_tokens":
        extra = {field: True}
    with pytest.raises(openai.BadRequestError) as caught:
        if route == "chat":
            client.chat.completions.create(
                model="llama", messages=MESSAGES, max_completion_tokens=1, extra_body=extra
            )
        else:
            client.completions.create(model="llama", prompt="x", max_tokens=1, extra_body=extra)
    assert caught.value.body["param"] == field
    assert field in caught.value.body["message"]


def test_continuous_usage_stats_puts_the_usage_so_far_in_every_chunk(client):
    """vLLM's `continuous_usage_stats` (load tools such as guidellm send it): each chunk's usage counts
    the tokens streamed so far, and the last one the whole request."""
    def tokens_in(chunk) -> int:
        """Output tokens a chunk carries, counted by their logprobs (deltas may merge several)."""
        if not chunk.choices or chunk.choices[0].logprobs is None:
            return 0
        logprobs = chunk.choices[0].logprobs
        return len(logprobs.content or []) if hasattr(logprobs, "content") else len(logprobs.tokens or [])

    for create, extra in (
        (client.completions.create, {"prompt": "x", "logprobs": 0}),
        (client.chat.completions.create, {"messages": MESSAGES, "logprobs": True}),
    ):
        chunks = list(
            create(
                model="llama",
                max_tokens=6,
                stream=True,
                stream_options={"include_usage": True, "continuous_usage_stats": True},
                extra_body={"ignore_eos": True},
                **extra,
            )
        )
        assert all(chunk.usage is not None for chunk in chunks)
        streamed = 0
        for chunk in chunks:
            streamed += tokens_in(chunk)
            assert chunk.usage.completion_tokens == streamed
        assert streamed == 6 and chunks[-1].usage.prompt_tokens > 0


def test_metadata_fields_are_ignored(client):
    reply = client.chat.completions.create(
        model="llama",
        messages=MESSAGES,
        max_completion_tokens=1,
        user="someone",
        metadata={"team": "a"},
        store=False,
        extra_body={"guided_decoding_backend": "llguidance", "best_of": 1, "suffix": None},
    )
    assert reply.usage.completion_tokens == 1


def test_the_new_fields_cross_the_wire_to_a_node():
    """Between api server and node a request carries its grammar as text, and its outputs their
    prompt logprobs."""
    from aegaeon.engine.outputs import RequestDelta, SequenceDelta
    from aegaeon.engine.sampler import TokenLogprobs
    from aegaeon.engine.sampling_params import GrammarSpec, SamplingParams
    from aegaeon.serve import wire

    params = SamplingParams(
        min_tokens=2,
        logit_bias={3: -100.0},
        prompt_logprobs=1,
        grammar=GrammarSpec("json_schema", json.dumps(PERSON), "response_format.json_schema"),
    )
    submit = wire.Submit("r", "llama", [1, 2], params)
    assert wire.decode_api_message(wire.encode(submit)) == submit
    delta = RequestDelta(
        "r", [SequenceDelta(0, [5], "x", None, None, [None, TokenLogprobs(2, -1.5, 3, [(4, -0.5)])])], False
    )
    message = wire.decode_node_message(wire.encode(wire.output_message(delta)))
    assert wire.request_output(message) == delta
