"""Where a request's time goes under aegaeon: queueing, switches, prefill, KV moves, decode, waiting.

The simulated instances charge each request the time it spent blocked on its own work: the prefill
that made its first token, the weight copies that its prefill group or decode turn waited for, the
moves of its KV (the hand-off from the prefill instance, swaps in and out around its turns) and the
decode steps it was part of. What is left of its latency is queueing before its prefill, and waiting
between turns while other batches ran.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

from aegaeon.scheduler.request import SchedRequest
from aegaeon.scheduler.turn_loop import DECODE, PREFILL  # the phases' names double as components

QUEUE = "queue"
SWITCH = "switch"
KV = "kv"
WAIT = "wait"
# In the order a request meets them.
COMPONENTS = (QUEUE, SWITCH, PREFILL, KV, DECODE, WAIT)
# A weight copy waited for before the request's prefill (inside its time to first token).
PREFILL_SWITCH = "prefill_switch"


class LatencyBreakdown:
    """Seconds charged to each request, by component."""

    def __init__(self) -> None:
        self._spent: dict[SchedRequest, dict[str, float]] = defaultdict(lambda: defaultdict(float))

    def charge(self, request: SchedRequest, component: str, seconds: float) -> None:
        if seconds > 0:
            self._spent[request][component] += seconds

    def charge_all(self, requests: Iterable[SchedRequest], component: str, seconds: float) -> None:
        if seconds > 0:
            for request in requests:
                self._spent[request][component] += seconds

    def of(self, request: SchedRequest) -> dict[str, float]:
        """The request's latency (arrival to last token) split into `COMPONENTS`; {} unless finished."""
        if request.finished_s is None or request.first_token_s is None:
            return {}
        spent = self._spent.get(request, {})
        first_token = request.first_token_s - request.arrival_s
        prefill_switch = spent.get(PREFILL_SWITCH, 0.0)
        prefill = spent.get(PREFILL, 0.0)
        parts = {
            QUEUE: max(first_token - prefill - prefill_switch, 0.0),
            SWITCH: prefill_switch + spent.get(SWITCH, 0.0),
            PREFILL: prefill,
            KV: spent.get(KV, 0.0),
            DECODE: spent.get(DECODE, 0.0),
        }
        total = request.finished_s - request.arrival_s
        parts[WAIT] = max(total - sum(parts.values()), 0.0)
        return parts

    def mean(self, requests: Iterable[SchedRequest]) -> dict[str, float]:
        """Mean seconds per component over the finished requests ({} if none finished)."""
        totals: dict[str, float] = defaultdict(float)
        count = 0
        for request in requests:
            parts = self.of(request)
            if parts:
                count += 1
                for component, seconds in parts.items():
                    totals[component] += seconds
        return {component: totals[component] / count for component in COMPONENTS} if count else {}


def shares(mean: Mapping[str, float]) -> dict[str, float]:
    """Each component's share of the mean latency."""
    total = sum(mean.values())
    return {component: seconds / total for component, seconds in mean.items()} if total > 0 else {}
