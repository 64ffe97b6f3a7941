"""A prompt checked against its model, the same way wherever it enters (engine, node, api server)."""

from __future__ import annotations

from dataclasses import dataclass

from aegaeon.engine.sampling_params import SamplingParams
from aegaeon.engine.tokenizer import Tokenizer
from aegaeon.errors import ContextLengthExceeded, InvalidRequest


@dataclass(frozen=True)
class PreparedPrompt:
    """A prompt checked against its model: its tokens and how many it may generate."""

    model: str
    text: str | None
    token_ids: list[int]
    max_tokens: int


def prompt_token_ids(
    tokenizer: Tokenizer, vocab_size: int, prompt: str | list[int]
) -> tuple[str | None, list[int]]:
    """The prompt's text (None when given as ids) and token ids; InvalidRequest saying what is wrong."""
    if isinstance(prompt, str):
        token_ids = tokenizer.encode(prompt)
        text: str | None = prompt
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        token_ids, text = list(prompt), None
        bad = [t for t in token_ids if not 0 <= t < vocab_size]
        if bad:
            message = f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab_size})"
            raise InvalidRequest(message, param="prompt")
    else:
        raise InvalidRequest("a prompt must be a string or a list of token ids", param="prompt")
    if not token_ids:
        raise InvalidRequest("the prompt is empty", param="prompt")
    return text, token_ids


def prepare_prompt(
    model: str,
    tokenizer: Tokenizer,
    vocab_size: int,
    max_model_len: int,
    prompt: str | list[int],
    params: SamplingParams,
) -> PreparedPrompt:
    """Tokenize and check a prompt; its max_tokens is capped by the room left in the context."""
    text, token_ids = prompt_token_ids(tokenizer, vocab_size, prompt)
    room = max_model_len - len(token_ids)
    if room < 1:
        raise ContextLengthExceeded(
            f"the prompt has {len(token_ids)} tokens; this model accepts at most "
            f"{max_model_len - 1} prompt tokens (max_model_len is {max_model_len})",
            param="prompt",
        )
    outside = [t for t in params.logit_bias if t >= vocab_size]
    if outside:
        message = f"logit_bias: token id {outside[0]} is outside the vocabulary [0, {vocab_size})"
        raise InvalidRequest(message, param="logit_bias")
    max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
    return PreparedPrompt(model, text, token_ids, max_tokens)
