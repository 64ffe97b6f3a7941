"""Plain-text tables of simulation results, sweeps and plans."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from aegaeon.sim.breakdown import shares
from aegaeon.sim.plan import PlanResult
from aegaeon.sim.result import SimResult
from aegaeon.sim.sweep import SweepPoint, sustained

# A sweep cell such as "98.2% / 92.0% / 80.1%" (paper / every stall charged / strict), right-aligned;
# wider when a series' name is longer.
CELL_WIDTH = 26


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def results_table(results: Sequence[SimResult]) -> str:
    """One row per run: attainment (paper, every stall charged, strict), TTFT and TBT percentiles,
    utilisation."""
    header = (
        f"{'policy':<11}{'models':>7}{'GPUs':>6}{'requests':>9}{'attain':>9}{'stall':>9}{'strict':>9}{'failed':>8}"
        f"{'TTFT mean':>10}{'p50':>8}{'p99':>8}{'TBT p50':>9}{'p99':>8}{'GPU util':>9}{'sim s':>7}"
    )
    rows = [header]
    for r in results:
        rep = r.report
        rows.append(
            f"{r.policy:<11}{r.num_models:>7}{r.gpus:>6}{rep.num_requests:>9}{_pct(r.attainment):>9}"
            f"{_pct(r.stall_attainment):>9}{_pct(r.strict_attainment):>9}{rep.num_failed:>8}{_s(rep.mean_ttft_s):>10}{_s(rep.ttft_s['p50']):>8}"
            f"{_s(rep.ttft_s['p99']):>8}{_s(rep.tbt_s['p50']):>9}{_s(rep.tbt_s['p99']):>8}"
            f"{_pct(r.utilisation):>9}{r.wall_s:>7.1f}"
        )
    return "\n".join(rows)


def breakdown_line(mean: Mapping[str, float]) -> str:
    """A request's mean latency by component: seconds and share of the whole."""
    share = shares(mean)
    parts = ", ".join(f"{name} {seconds:.2f} s ({100 * share[name]:.0f}%)" for name, seconds in mean.items())
    return f"mean {sum(mean.values()):.2f} s = {parts}"


def sweep_table(axis: str, points: Mapping[str, Sequence[SweepPoint]], target: float) -> str:
    """Attainment (paper / every stall charged / strict) per policy at each swept value, and what
    each sustains (by the paper attainment)."""
    policies = list(points)
    values = sorted({p.value for series in points.values() for p in series})
    label = "models" if axis == "models" else "rate/model"
    width = max([CELL_WIDTH, *(len(policy) + 2 for policy in policies)])
    rows = [f"{label:>10}" + "".join(f"{policy:>{width}}" for policy in policies)]
    for value in values:
        cells = []
        for policy in policies:
            point = next((p for p in points[policy] if p.value == value), None)
            cell = (
                "-"
                if point is None
                else f"{_pct(point.result.attainment)} / {_pct(point.result.stall_attainment)}"
                f" / {_pct(point.result.strict_attainment)}"
            )
            cells.append(f"{cell:>{width}}")
        shown = f"{value:g}"
        rows.append(f"{shown:>10}" + "".join(cells))
    sustained_row = [sustained(points[policy], target) for policy in policies]
    rows.append(
        f"{'sustained':>10}" + "".join(f"{('-' if v is None else f'{v:g}'):>{width}}" for v in sustained_row)
    )
    return "\n".join(rows)


def plan_table(answers: Sequence[PlanResult], target: float) -> str:
    rows = [
        f"GPUs needed for {100 * target:.0f}% SLO attainment",
        f"{'policy':<11}{'GPUs':>6}{'attain':>9}{'stall':>9}{'strict':>9}",
    ]
    for answer in answers:
        gpus = "-" if answer.gpus is None else str(answer.gpus)
        attain = answer.result.attainment if answer.result else None
        stall = answer.result.stall_attainment if answer.result else None
        strict = answer.result.strict_attainment if answer.result else None
        rows.append(f"{answer.policy:<11}{gpus:>6}{_pct(attain):>9}{_pct(stall):>9}{_pct(strict):>9}")
    return "\n".join(rows)
