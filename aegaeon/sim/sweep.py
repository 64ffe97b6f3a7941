"""Sweeps: one policy set run over a range of model counts or per-model rates."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from aegaeon.sim.result import SimResult
from aegaeon.sim.scenario import Scenario
from aegaeon.sim.workload import WorkloadConfig, generate_workload

SWEEP_AXES = ("models", "rate")


@dataclass(frozen=True)
class SweepPoint:
    value: float
    result: SimResult


def sweep(
    axis: str,
    values: Sequence[float],
    policies: Sequence[str],
    workload: WorkloadConfig,
    scenario: Scenario,
    progress: Callable[[str, float, SimResult], None] | None = None,
) -> dict[str, list[SweepPoint]]:
    """Each policy at each value of `axis` ("models": model count, "rate": requests/s per model)."""
    if axis not in SWEEP_AXES:
        raise ValueError(f"sweep axis must be one of {SWEEP_AXES}, got {axis!r}")
    if not values:
        raise ValueError("a sweep needs at least one value")
    points: dict[str, list[SweepPoint]] = {policy: [] for policy in policies}
    for value in values:
        if axis == "models":
            config = replace(workload, num_models=int(value))
        else:
            config = replace(workload, rate_per_model=float(value))
        arrivals = generate_workload(config)
        models = scenario.model_set(config.model_names())
        for policy in policies:
            result = scenario.run(policy, arrivals, models)
            points[policy].append(SweepPoint(value, result))
            if progress is not None:
                progress(policy, value, result)
    return points


def sustained(points: Sequence[SweepPoint], target: float) -> float | None:
    """The largest swept value whose attainment is at least `target`, with every smaller one too."""
    best = None
    for point in sorted(points, key=lambda p: p.value):
        if point.result.attainment < target:
            break
        best = point.value
    return best
