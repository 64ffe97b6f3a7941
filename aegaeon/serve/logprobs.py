"""Token logprobs in the OpenAI shapes: completions' parallel lists, chat's per-token entries."""

from __future__ import annotations

from aegaeon.engine.sampler import TokenLogprobs
from aegaeon.engine.tokenizer import Tokenizer
from aegaeon.serve.protocol import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    PromptLogprob,
    TopLogprob,
)

# JSON has no -inf; vLLM reports a token the model rules out at this floor instead.
LOGPROB_FLOOR = -9999.0


def _logprob(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


def _top_by_text(tokenizer: Tokenizer, top: list[tuple[int, float]]) -> dict[str, float]:
    """Top logprobs keyed by token text; of two tokens that read the same, the likelier is kept."""
    result: dict[str, float] = {}
    for token_id, logprob in top:
        result.setdefault(tokenizer.token_text(token_id), _logprob(logprob))
    return result


def completion_logprobs(
    tokenizer: Tokenizer, logprobs: list[TokenLogprobs], text_offset: int
) -> CompletionLogprobs:
    result = CompletionLogprobs()
    for entry in logprobs:
        token = tokenizer.token_text(entry.token_id)
        result.tokens.append(token)
        result.token_logprobs.append(_logprob(entry.logprob))
        result.top_logprobs.append(_top_by_text(tokenizer, entry.top))
        result.text_offset.append(text_offset)
        text_offset += len(token)
    return result


def chat_logprobs(tokenizer: Tokenizer, logprobs: list[TokenLogprobs]) -> ChatLogprobs:
    def top(token_id: int, logprob: float) -> TopLogprob:
        token = tokenizer.token_text(token_id)
        return TopLogprob(token=token, logprob=_logprob(logprob), bytes=list(token.encode("utf-8")))

    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                **top(entry.token_id, entry.logprob).model_dump(),
                top_logprobs=[top(t, lp) for t, lp in entry.top],
            )
            for entry in logprobs
        ]
    )


def echo_logprobs(
    tokenizer: Tokenizer, prompt_ids: list[int], prompt_logprobs: list[TokenLogprobs | None], k: int
) -> CompletionLogprobs:
    """The echoed prompt's tokens in the completions shape; the first has no logprob (null)."""
    result = CompletionLogprobs()
    text_offset = 0
    for position, token_id in enumerate(prompt_ids):
        entry = prompt_logprobs[position] if position < len(prompt_logprobs) else None
        token = tokenizer.token_text(token_id)
        result.tokens.append(token)
        result.token_logprobs.append(None if entry is None else _logprob(entry.logprob))
        result.top_logprobs.append(None if entry is None else _top_by_text(tokenizer, entry.top[:k]))
        result.text_offset.append(text_offset)
        text_offset += len(token)
    return result


def joined(first: CompletionLogprobs, then: CompletionLogprobs) -> CompletionLogprobs:
    """Two runs of completions logprobs, one after the other."""
    return CompletionLogprobs(
        tokens=first.tokens + then.tokens,
        token_logprobs=first.token_logprobs + then.token_logprobs,
        top_logprobs=first.top_logprobs + then.top_logprobs,
        text_offset=first.text_offset + then.text_offset,
    )


def prompt_logprobs_by_token(
    tokenizer: Tokenizer, prompt_logprobs: list[TokenLogprobs | None], k: int
) -> list[dict[str, PromptLogprob] | None]:
    """vLLM's `prompt_logprobs`: per prompt token (the first: null) the token itself and its top k."""
    result: list[dict[str, PromptLogprob] | None] = []
    for entry in prompt_logprobs:
        if entry is None:
            result.append(None)
            continue
        candidates = {
            str(entry.token_id): PromptLogprob(
                logprob=_logprob(entry.logprob),
                rank=entry.rank,
                decoded_token=tokenizer.token_text(entry.token_id),
            )
        }
        for rank, (token_id, logprob) in enumerate(entry.top[:k], start=1):
            candidates.setdefault(
                str(token_id),
                PromptLogprob(
                    logprob=_logprob(logprob), rank=rank, decoded_token=tokenizer.token_text(token_id)
                ),
            )
        result.append(candidates)
    return result
