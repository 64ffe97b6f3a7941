"""Attainment curves of a sweep, as a PNG (matplotlib, imported only when a plot is asked for)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from aegaeon.sim.sweep import SweepPoint

AXIS_LABELS = {"models": "models served", "rate": "requests/s per model"}
STYLES = {"aegaeon": "o-", "serverless": "s--", "mux": "^-.", "dedicated": "d:"}
# A label such as "serverless (2 s start)" is drawn in its policy's style.


def plot_sweep(
    axis: str, points: Mapping[str, Sequence[SweepPoint]], path: str | Path, target: float, title: str = ""
) -> Path:
    """Draw attainment (and strict attainment, faint) against the swept value, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8.5, 4.2), dpi=120)
    for policy, series in points.items():
        xs = [p.value for p in series]
        style = STYLES.get(policy.split(" ")[0], "o-")
        line = axes.plot(xs, [100 * p.result.attainment for p in series], style, label=policy)[0]
        axes.plot(
            xs, [100 * p.result.strict_attainment for p in series], style, color=line.get_color(), alpha=0.25
        )
    axes.axhline(100 * target, color="grey", linewidth=0.8)
    axes.set_xlabel(AXIS_LABELS.get(axis, axis))
    axes.set_ylabel("SLO attainment (%)")
    axes.set_ylim(0, 102)
    axes.grid(alpha=0.3)
    axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    axes.set_title(title or "SLO attainment (faint: strict, every TBT met)", fontsize=9)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
