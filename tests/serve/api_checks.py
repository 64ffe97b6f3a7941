"""What the OpenAI API tests share: the models, the greedy settings, and how a request is checked."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

MODELS = ("llama", "qwen2", "mistral")
TOKENS = 8
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a river."}]


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


def run_request(client, kind: str, model: str, stream: bool) -> tuple[str, int, int]:
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


def check_concurrent_requests(client, model_dirs, tokenizers, hf_greedy) -> None:
    """Chat and completions of every model, streamed and not, all at once: each gives its greedy tokens."""
    jobs = [
        (kind, model, stream)
        for kind in ("chat", "completion")
        for model in MODELS
        for stream in (False, True)
    ]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: run_request(client, *job), jobs))
    for (kind, model, _), (text, prompt_tokens, completion_tokens) in zip(jobs, results, strict=True):
        tokenizer = tokenizers[model]
        ids = (
            tokenizer.apply_chat_template(MESSAGES) if kind == "chat" else tokenizer.encode("Bread and honey")
        )
        assert text == expected_text(model_dirs, tokenizers, hf_greedy, model, ids), (kind, model)
        assert (prompt_tokens, completion_tokens) == (len(ids), TOKENS)
