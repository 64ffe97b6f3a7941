"""The scheduler's view of one request: where it stands and when each of its tokens came out."""

from __future__ import annotations

from dataclasses import dataclass, field

from aegaeon.config import DEFAULT_KEY_WEIGHT, check_weight


@dataclass(eq=False)
class SchedRequest:
    """A request as the schedulers and the SLO metrics see it (identity equality: one object per request)."""

    request_id: str
    model: str
    arrival_s: float
    prompt_len: int
    max_tokens: int
    # Output tokens generated so far (the prefill makes the first one).
    generated: int = 0
    # When each output token came out; token_times[0] is the first token (the end of the prefill).
    token_times: list[float] = field(default_factory=list)
    finished_s: float | None = None
    failed: bool = False
    # The API key the request came with, by id (never the key itself; None: no keys are configured),
    # and its weight: the key's share of the model's waiting queue (fair_queue.py).
    key: str | None = None
    key_weight: float = DEFAULT_KEY_WEIGHT

    def __post_init__(self) -> None:
        self.key_weight = check_weight("key_weight", self.key_weight)
        if self.prompt_len < 1:
            raise ValueError(f"prompt_len must be >= 1, got {self.prompt_len}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    @property
    def context_len(self) -> int:
        """Tokens the next decode step attends over (prompt plus every output token so far)."""
        return self.prompt_len + self.generated

    @property
    def final_len(self) -> int:
        """The longest this request's sequence can grow: prompt plus max_tokens."""
        return self.prompt_len + self.max_tokens

    @property
    def remaining_tokens(self) -> int:
        return max(self.max_tokens - self.generated, 0)

    @property
    def first_token_s(self) -> float | None:
        return self.token_times[0] if self.token_times else None

    @property
    def done(self) -> bool:
        """Finished or failed: no more tokens will come."""
        return self.finished_s is not None or self.failed

    def record_token(self, now: float) -> None:
        """One output token came out at `now`; finishes the request when it reaches max_tokens."""
        if self.done:
            raise ValueError(f"request {self.request_id} is already done")
        self.generated += 1
        self.token_times.append(now)
        if self.generated >= self.max_tokens:
            self.finished_s = now

    def finish(self, now: float) -> None:
        """The request stopped early (end of sequence, stop string) at `now`."""
        if not self.done:
            self.finished_s = now

    def fail(self, now: float) -> None:
        """The request was aborted at `now`; it scores 0 in the SLO metrics."""
        if not self.done:
            self.failed = True
            self.finished_s = now
