"""What generation hands back to callers (the shapes vLLM users know)."""

from __future__ import annotations

from dataclasses import dataclass

from aegaeon.engine.sampler import TokenLogprobs


@dataclass
class CompletionOutput:
    """One of a request's `n` generated sequences."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprobs] | None


@dataclass
class RequestOutput:
    """A request's state after a step; `text`, `token_ids`... are those of its first sequence."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[TokenLogprobs] | None:
        return self.outputs[0].logprobs
