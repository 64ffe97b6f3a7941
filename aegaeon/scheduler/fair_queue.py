"""Weighted fair queuing of one model's waiting requests by API key (self-clocked: SCFQ).

Each request gets a finish tag when it is queued: its key's previous tag (or the model's virtual
time, if later) plus its predicted prefill seconds divided by its key's weight. Requests then run in
tag order, so each key with requests waiting gets a share of the model's prefill time in proportion
to its weight, and a key sending ten times another's rate cannot queue its backlog ahead of the
other's next request. The virtual time is the tag of the request that started last: a key that was
idle starts level with those being served, earning no credit for its idle time. Requests of one key
(and requests without a key, which share one flow) keep their arrival order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aegaeon.scheduler.request import SchedRequest

# A request's cost is its predicted prefill seconds; a predictor may say 0 (its fit clamped there),
# and a zero cost would tie every tag. A microsecond is far below any real prefill.
MIN_COST_S = 1e-6


@dataclass
class ModelClock:
    """The fair-queuing state of one model: its virtual time and each key's latest finish tag."""

    virtual_s: float = 0.0
    last_finish_s: dict[str | None, float] = field(default_factory=dict)


class FairQueuing:
    """Finish tags of queued requests, per model, by key."""

    def __init__(self) -> None:
        self._clocks: dict[str, ModelClock] = {}

    def tag(self, request: SchedRequest, cost_s: float) -> float:
        """Queue `request` (costing `cost_s` of prefill): its finish tag; lower tags run first."""
        clock = self._clocks.setdefault(request.model, ModelClock())
        start = max(clock.virtual_s, clock.last_finish_s.get(request.key, clock.virtual_s))
        finish = start + max(cost_s, MIN_COST_S) / request.key_weight
        clock.last_finish_s[request.key] = finish
        return finish

    def started(self, model: str, tag: float) -> None:
        """A request of `model` with finish tag `tag` started: the model's virtual time moves on."""
        clock = self._clocks.get(model)
        if clock is None or tag <= clock.virtual_s:
            return
        clock.virtual_s = tag
        # Keys with nothing queued beyond the virtual time are level with a new key: forget them, so
        # the state holds only keys with requests waiting.
        clock.last_finish_s = {key: f for key, f in clock.last_finish_s.items() if f > tag}
