"""Capacity planning: the fewest GPUs with which each policy sustains a workload.

Attainment grows with the GPU count (more devices never hurt any of these policies, up to noise),
so the search doubles the count until the target is met, then bisects between the last failure and
the first success: about 2·log2(answer) simulations per policy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aegaeon.sim.result import SimResult
from aegaeon.sim.scenario import Scenario
from aegaeon.sim.workload import Arrival, workload_models

DEFAULT_MAX_GPUS = 512


@dataclass(frozen=True)
class PlanResult:
    """The answer for one policy: GPUs needed (None: not within max_gpus) and every count tried."""

    policy: str
    gpus: int | None
    tried: dict[int, float]  # GPU count -> attainment
    result: SimResult | None  # the run at the answer

    def to_dict(self) -> dict:
        return {
            "policy": self.policy,
            "gpus": self.gpus,
            "attainment": self.result.attainment if self.result else None,
            "stall_attainment": self.result.stall_attainment if self.result else None,
            "strict_attainment": self.result.strict_attainment if self.result else None,
            "tried": {str(k): v for k, v in sorted(self.tried.items())},
        }


def fewest_gpus(
    run: Callable[[int], SimResult], target: float, max_gpus: int = DEFAULT_MAX_GPUS, start: int = 1
) -> tuple[int | None, dict[int, float], SimResult | None]:
    """Smallest n in [start, max_gpus] with run(n).attainment >= target, assuming attainment grows with n."""
    if not 0 < target <= 1:
        raise ValueError(f"target attainment must be in (0, 1], got {target}")
    if not 1 <= start <= max_gpus:
        raise ValueError(f"need 1 <= start <= max_gpus, got start={start}, max_gpus={max_gpus}")
    tried: dict[int, float] = {}
    results: dict[int, SimResult] = {}

    def ok(n: int) -> bool:
        if n not in results:
            results[n] = run(n)
            tried[n] = results[n].attainment
        return tried[n] >= target

    low, n = start - 1, start  # low: largest count known to fail
    while not ok(n):
        low = n
        if n == max_gpus:
            return None, tried, None
        n = min(2 * n, max_gpus)
    high = n
    while high - low > 1:
        mid = (low + high) // 2
        if ok(mid):
            high = mid
        else:
            low = mid
    return high, tried, results[high]


def plan(
    arrivals: Sequence[Arrival],
    scenario: Scenario,
    policies: Sequence[str],
    target: float,
    max_gpus: int = DEFAULT_MAX_GPUS,
    progress: Callable[[str, int, float], None] | None = None,
) -> list[PlanResult]:
    """The fewest GPUs each policy needs to reach `target` attainment on the arrivals.

    With tensor-parallel instances of k devices the count searched is a multiple of k (whole instances).
    """
    models = scenario.model_set(workload_models(arrivals))
    tp = scenario.tp()
    if scenario.gpus_per_node % tp:
        raise ValueError(f"nodes of {scenario.gpus_per_node} devices do not split into instances of {tp}")
    if max_gpus < tp:
        raise ValueError(f"max_gpus {max_gpus} is less than one instance of {tp} devices")
    answers = []
    for policy in policies:

        def run(instances: int, policy: str = policy) -> SimResult:
            result = scenario.with_gpus(instances * tp).run(policy, arrivals, models)
            if progress is not None:
                progress(policy, instances * tp, result.attainment)
            return result

        instances, tried, result = fewest_gpus(run, target, max_gpus // tp)
        gpus = instances * tp if instances is not None else None
        answers.append(PlanResult(policy, gpus, {n * tp: att for n, att in tried.items()}, result))
    return answers
