"""Token logprobs in the OpenAI shapes: completions' parallel lists, chat's per-token entries."""

from __future__ import annotations

from aegaeon.engine.sampler import TokenLogprobs
from aegaeon.engine.tokenizer import Tokenizer
from aegaeon.serve.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob

# JSON has no -inf; vLLM reports a token the model rules out at this floor instead.
LOGPROB_FLOOR = -9999.0


def _logprob(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


def completion_logprobs(
    tokenizer: Tokenizer, logprobs: list[TokenLogprobs], text_offset: int
) -> CompletionLogprobs:
    result = CompletionLogprobs()
    for entry in logprobs:
        token = tokenizer.token_text(entry.token_id)
        result.tokens.append(token)
        result.token_logprobs.append(_logprob(entry.logprob))
        result.top_logprobs.append({tokenizer.token_text(t): _logprob(lp) for t, lp in entry.top})
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
