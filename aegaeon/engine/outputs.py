"""What generation hands back: per step, what is new (deltas); to the offline API's user, whole outputs.

A step's `RequestDelta` holds plain values only, so it crosses processes cheaply and its size does
not grow with the length of the generation. The layers that need running totals fold deltas into a
`RequestOutput` (the shape vLLM users know) with `RequestOutput.add`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aegaeon.engine.sampler import TokenLogprobs


@dataclass
class SequenceDelta:
    """What one step (or a run of steps, merged) added to one of a request's `n` sequences."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprobs] | None  # None when the request did not ask for logprobs
    finish_reason: str | None
    # With the first token of a request that asked for them: each prompt token's (the first: None).
    prompt_logprobs: list[TokenLogprobs | None] | None = None


@dataclass
class RequestDelta:
    """What a step added to a request: one entry per sequence it advanced, index order."""

    request_id: str
    outputs: list[SequenceDelta]
    finished: bool

    def merge(self, later: RequestDelta) -> RequestDelta:
        """This delta followed by a later one of the same request, as one delta."""
        merged = {seq.index: seq for seq in self.outputs}
        for seq in later.outputs:
            earlier = merged.get(seq.index)
            if earlier is None:
                merged[seq.index] = seq
                continue
            logprobs = earlier.logprobs
            if seq.logprobs is not None:
                logprobs = (logprobs or []) + seq.logprobs
            merged[seq.index] = SequenceDelta(
                seq.index,
                earlier.token_ids + seq.token_ids,
                earlier.text + seq.text,
                logprobs,
                seq.finish_reason or earlier.finish_reason,
                earlier.prompt_logprobs if earlier.prompt_logprobs is not None else seq.prompt_logprobs,
            )
        outputs = [merged[index] for index in sorted(merged)]
        return RequestDelta(self.request_id, outputs, self.finished or later.finished)


@dataclass
class CompletionOutput:
    """One of a request's `n` generated sequences, so far."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] | None = None


@dataclass
class RequestOutput:
    """A request's output so far; `text`, `token_ids`... are those of its first sequence."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # asked for by params.prompt_logprobs

    def add(self, delta: RequestDelta) -> None:
        """Append a step's delta of this request."""
        for new in delta.outputs:
            seq = self._sequence(new.index)
            seq.token_ids.extend(new.token_ids)
            seq.text += new.text
            if new.logprobs is not None:
                if seq.logprobs is None:
                    seq.logprobs = []
                seq.logprobs.extend(new.logprobs)
            seq.finish_reason = new.finish_reason or seq.finish_reason
            if new.prompt_logprobs is not None:
                self.prompt_logprobs = new.prompt_logprobs
        self.finished = self.finished or delta.finished

    def _sequence(self, index: int) -> CompletionOutput:
        for seq in self.outputs:
            if seq.index == index:
                return seq
        seq = CompletionOutput(index)
        self.outputs.append(seq)
        self.outputs.sort(key=lambda s: s.index)
        return seq

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
