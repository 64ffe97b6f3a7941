"""The paper's figures, reproduced in the simulator: every setting of docs/simulation.md's table.

    python benchmarks/sim_figures.py run [--only NAME ...] [--out DIR]     # run settings, one JSON each
    python benchmarks/sim_figures.py report [--out DIR] [--plots docs]     # summarise them, draw PNGs

Each setting is the paper's main setup (the defaults of `aegaeon simulate`: 16 H100s as two nodes of
3 prefill + 5 decode, models 6:2:2 over Qwen2.5-7B / Yi-1.5-9B / Llama-2-13B, 0.1 requests/s per
model, 700 / 290-token means, TTFT 10 s, TBT 100 ms, 600 s of arrivals) with one thing changed, swept
over the model count or the per-model rate, at the default switch cost (host link efficiency 0.5) and
at the paper artifact's estimate (0.08). `run` writes DIR/NAME.json as it finishes each setting, so
an interrupted run keeps what it did; `report` prints each setting's attainment (paper / every stall
charged / strict) and what each policy sustains, and draws the curves and the latency breakdown.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from aegaeon.config import DEFAULT_ATTAINMENT_TARGET, SLO, SchedulerConfig
from aegaeon.sim.breakdown import COMPONENTS
from aegaeon.sim.derive import ARTIFACT_HOST_LINK_EFFICIENCY, DEFAULT_HOST_LINK_EFFICIENCY
from aegaeon.sim.scenario import Scenario
from aegaeon.sim.sweep import sweep
from aegaeon.sim.workload import LengthConfig, WorkloadConfig

DEFAULT_OUT = Path(".bench/sim_figures")
TBT_TIGHT_S = 0.05
TBT_LOOSE_S = 0.2
LENGTH_SCALE = 2  # doubled input and output lengths
RATE_SWEEP_MODELS = 32
# The model count a models sweep starts its workload from (the sweep replaces it).
PAPER_SWEEP_START = 16


@dataclass(frozen=True)
class Setting:
    """One curve family of a figure: a sweep of the paper's setup with one thing changed."""

    name: str
    figure: str
    axis: str
    values: tuple[float, ...]
    policies: tuple[str, ...]
    link_efficiency: float
    workload: WorkloadConfig = field(default_factory=lambda: WorkloadConfig(num_models=PAPER_SWEEP_START))
    tbt_s: float | None = None
    kinds: tuple[str, ...] | None = None

    def scenario(self) -> Scenario:
        base = Scenario(link_efficiency=self.link_efficiency)
        if self.kinds is not None:
            base = replace(base, kinds=self.kinds, mix=None)
        if self.tbt_s is not None:
            slo = SLO(base.scheduler.default_slo.ttft_s, self.tbt_s)
            base = replace(base, scheduler=replace(SchedulerConfig(), default_slo=slo))
        return base


def _settings() -> list[Setting]:
    fast, slow = DEFAULT_HOST_LINK_EFFICIENCY, ARTIFACT_HOST_LINK_EFFICIENCY
    both = ("aegaeon", "serverless")
    paper = LengthConfig()
    doubled = replace(
        paper,
        input_mean=LENGTH_SCALE * paper.input_mean,
        output_mean=LENGTH_SCALE * paper.output_mean,
        max_input=LENGTH_SCALE * paper.max_input,
        max_output=LENGTH_SCALE * paper.max_output,
    )
    long = WorkloadConfig(num_models=PAPER_SWEEP_START, lengths=doubled)
    rate = WorkloadConfig(num_models=RATE_SWEEP_MODELS)
    rates = (0.025, 0.05, 0.1, 0.2, 0.4)
    return [
        Setting("breakdown-fast", "Fig. 14", "models", (16, 80, 144), ("aegaeon",), fast),
        Setting("breakdown-slow", "Fig. 14", "models", (16, 24, 32), ("aegaeon",), slow),
        Setting(
            "rate0.5-slow",
            "Fig. 11b",
            "models",
            (8, 16, 24, 32),
            both,
            slow,
            WorkloadConfig(num_models=PAPER_SWEEP_START, rate_per_model=0.5),
        ),
        Setting("rate-fast", "rate", "rate", rates, (*both, "mux"), fast, rate),
        Setting("rate-slow", "rate", "rate", rates, both, slow, rate),
        Setting("rate-fast-high", "rate", "rate", (0.8, 1.6), ("aegaeon", "mux"), fast, rate),
        Setting("tbt-tight-fast", "TBT", "models", (48, 96, 144), ("aegaeon",), fast, tbt_s=TBT_TIGHT_S),
        Setting("tbt-loose-fast", "TBT", "models", (96, 144, 192), ("aegaeon",), fast, tbt_s=TBT_LOOSE_S),
        Setting("tbt-tight-slow", "TBT", "models", (8, 16, 24, 32), ("aegaeon",), slow, tbt_s=TBT_TIGHT_S),
        Setting("tbt-loose-slow", "TBT", "models", (16, 24, 32), ("aegaeon",), slow, tbt_s=TBT_LOOSE_S),
        Setting("tbt-serverless", "TBT", "models", (16, 24), ("serverless",), fast, tbt_s=TBT_TIGHT_S),
        Setting("long-fast", "lengths", "models", (32, 64, 96, 128), both, fast, long),
        Setting("long-fast-high", "lengths", "models", (160,), ("aegaeon",), fast, long),
        Setting("long-slow", "lengths", "models", (8, 16, 24, 32), both, slow, long),
        Setting(
            "tp72-fast",
            "72B TP 4",
            "models",
            (4, 8, 12, 16, 20, 24),
            ("aegaeon", "serverless", "mux"),
            fast,
            kinds=("Qwen2.5-72B",),
        ),
        Setting(
            "tp72-slow",
            "72B TP 4",
            "models",
            (4, 8, 12),
            ("aegaeon", "serverless"),
            slow,
            kinds=("Qwen2.5-72B",),
        ),
    ]


def _point(value: float, result) -> dict:
    r = result.report
    return {
        "value": value,
        "attainment": result.attainment,
        "stall_attainment": result.stall_attainment,
        "strict_attainment": result.strict_attainment,
        "requests": r.num_requests,
        "failed": r.num_failed,
        "mean_ttft_s": r.mean_ttft_s,
        "tbt_p99_s": r.tbt_s["p99"],
        "busy_share": result.busy_share(),
        "breakdown_s": result.breakdown,
        "layout": result.layout,
        "wall_s": result.wall_s,
    }


def run(settings: Sequence[Setting], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for setting in settings:
        started = time.perf_counter()

        def progress(policy: str, value: float, result, name: str = setting.name) -> None:
            print(
                f"  {name} {value:g} {policy}: {100 * result.attainment:.1f}% ({result.wall_s:.0f} s)",
                flush=True,
            )

        points = sweep(
            setting.axis, setting.values, setting.policies, setting.workload, setting.scenario(), progress
        )
        record = {
            "name": setting.name,
            "figure": setting.figure,
            "axis": setting.axis,
            "link_efficiency": setting.link_efficiency,
            "tbt_s": setting.tbt_s,
            "workload": {
                "models": setting.workload.num_models,
                "rate": setting.workload.rate_per_model,
                "input_mean": setting.workload.lengths.input_mean,
                "output_mean": setting.workload.lengths.output_mean,
            },
            "wall_s": time.perf_counter() - started,
            "points": {
                policy: [_point(p.value, p.result) for p in series] for policy, series in points.items()
            },
        }
        (out / f"{setting.name}.json").write_text(json.dumps(record, indent=1))
        print(f"{setting.name}: {record['wall_s']:.0f} s", flush=True)


def _sustained(series: Sequence[dict], target: float) -> float | None:
    best = None
    for point in sorted(series, key=lambda p: p["value"]):
        if point["attainment"] < target:
            break
        best = point["value"]
    return best


def report(out: Path, plots: Path | None, target: float) -> None:
    records = {path.stem: json.loads(path.read_text()) for path in sorted(out.glob("*.json"))}
    for name, record in records.items():
        print(
            f"\n{name} ({record['figure']}, link efficiency {record['link_efficiency']}, "
            f"{record['wall_s']:.0f} s)"
        )
        for policy, series in record["points"].items():
            cells = ", ".join(
                f"{p['value']:g}: {100 * p['attainment']:.1f} / {100 * p['stall_attainment']:.1f} / "
                f"{100 * p['strict_attainment']:.1f}"
                for p in series
            )
            print(f"  {policy:<11} sustains {_sustained(series, target)}; {cells}")
            for p in series:
                if p["breakdown_s"]:
                    parts = ", ".join(f"{k} {v:.2f}" for k, v in p["breakdown_s"].items())
                    print(f"    {p['value']:g}: latency {sum(p['breakdown_s'].values()):.2f} s = {parts}")
    if plots is not None:
        _plot(records, plots, target)


def _curves(axes, records: dict, names: Sequence[str], target: float, xlabel: str) -> None:
    """One line per policy and setting label (the settings' points merged, e.g. a sweep's extension)."""
    styles = {"aegaeon": "o-", "serverless": "s--", "mux": "^-."}
    lines: dict[str, list[dict]] = {}
    for name in names:
        record = records.get(name)
        if record is None:
            continue
        tbt = f", TBT {1000 * record['tbt_s']:g} ms" if record["tbt_s"] else ""
        for policy, series in record["points"].items():
            lines.setdefault(f"{policy}, link efficiency {record['link_efficiency']}{tbt}", []).extend(series)
    for label, series in lines.items():
        series = sorted(series, key=lambda p: p["value"])
        axes.plot(
            [p["value"] for p in series],
            [100 * p["attainment"] for p in series],
            styles.get(label.split(",")[0], "o-"),
            label=label,
        )
    if xlabel.startswith("requests/s"):
        axes.set_xscale("log", base=2)
    axes.axhline(100 * target, color="grey", linewidth=0.8)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("SLO attainment, paper score (%)")
    axes.set_ylim(0, 102)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)


def _plot(records: dict, plots: Path, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    figures = {
        "sim-rate.png": (
            ["rate-fast", "rate-fast-high", "rate-slow"],
            f"requests/s per model ({RATE_SWEEP_MODELS} models, log scale)",
        ),
        "sim-tbt.png": (
            ["tbt-tight-fast", "tbt-loose-fast", "tbt-tight-slow", "tbt-loose-slow", "tbt-serverless"],
            "models (0.1 requests/s each)",
        ),
        "sim-lengths.png": (
            ["long-fast", "long-fast-high", "long-slow"],
            "models (0.1 requests/s each, doubled lengths)",
        ),
        "sim-tp72.png": (["tp72-fast", "tp72-slow"], "Qwen2.5-72B models at TP 4 on 16 H100s"),
    }
    for filename, (names, xlabel) in figures.items():
        figure, axes = plt.subplots(figsize=(8, 4.2), dpi=110)
        _curves(axes, records, names, target, xlabel)
        figure.tight_layout()
        figure.savefig(plots / filename)
        plt.close(figure)
    bars = [
        (f"{record['name'].split('-')[1]} {p['value']:g}", p["breakdown_s"])
        for name in ("breakdown-fast", "breakdown-slow")
        if (record := records.get(name))
        for p in record["points"]["aegaeon"]
    ]
    if bars:
        figure, axes = plt.subplots(figsize=(8, 4.2), dpi=110)
        bottoms = [0.0] * len(bars)
        for component in COMPONENTS:
            heights = [parts.get(component, 0.0) for _, parts in bars]
            axes.bar([label for label, _ in bars], heights, bottom=bottoms, label=component)
            bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
        axes.set_ylabel("mean seconds per request")
        axes.set_xlabel("switch cost (fast: link efficiency 0.5, slow: 0.08) and models, 0.1 requests/s each")
        axes.legend(fontsize=8)
        axes.grid(alpha=0.3, axis="y")
        figure.tight_layout()
        figure.savefig(plots / "sim-breakdown.png")
        plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("action", choices=("run", "report"))
    parser.add_argument("--only", nargs="+", help="settings to run (default: all)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--plots", type=Path, help="report: draw the PNGs into this folder")
    parser.add_argument("--target", type=float, default=DEFAULT_ATTAINMENT_TARGET)
    args = parser.parse_args()
    settings = _settings()
    if args.only:
        known = {s.name for s in settings}
        unknown = sorted(set(args.only) - known)
        if unknown:
            raise SystemExit(f"unknown settings {unknown}; known: {sorted(known)}")
        settings = [s for s in settings if s.name in args.only]
    if args.action == "run":
        run(settings, args.out)
    else:
        report(args.out, args.plots, args.target)


if __name__ == "__main__":
    main()
