"""How much of aegaeon's lead over request-level scaling depends on the engine start a scale-up pays.

    python benchmarks/sim_serverless_start.py [--values 16 24 ...] [--starts 0 2 5 13 30]
        [--plot docs/sim-serverless-start.png]

The paper's main setup (the defaults of `aegaeon simulate`: 16 H100s, models 6:2:2 over Qwen2.5-7B /
Yi-1.5-9B / Llama-2-13B, 0.1 requests/s each) swept over the model count, for aegaeon with its
defaults and for the serverless baseline with each engine start in `--starts` (seconds on top of the
weight copy; 13 s, the default, is vLLM's measured start, see aegaeon/sim/policies/serverless.py).
Prints attainment per series and what each sustains; draws the curves. About 13 minutes on two cores.
"""

from __future__ import annotations

import argparse

from aegaeon.config import DEFAULT_ATTAINMENT_TARGET
from aegaeon.sim.plot import plot_sweep
from aegaeon.sim.policies.serverless import DEFAULT_STARTUP_S, ServerlessOptions
from aegaeon.sim.report import sweep_table
from aegaeon.sim.runner import SimOptions
from aegaeon.sim.scenario import Scenario
from aegaeon.sim.sweep import SweepPoint, sweep
from aegaeon.sim.workload import WorkloadConfig

MODEL_COUNTS = (16, 24, 32, 40, 48, 56, 64, 72, 80, 96, 112, 128, 160)
STARTS_S = (0.0, 2.0, 5.0, DEFAULT_STARTUP_S, 30.0)


def serverless_label(start_s: float) -> str:
    return f"serverless ({start_s:g} s start)"


def run(values: list[float], starts: list[float]) -> dict[str, list[SweepPoint]]:
    workload = WorkloadConfig(num_models=int(values[0]))
    points = sweep("models", values, ["aegaeon"], workload, Scenario())
    for start_s in starts:
        scenario = Scenario(options=SimOptions(serverless=ServerlessOptions(startup_s=start_s)))
        series = sweep("models", values, ["serverless"], workload, scenario)["serverless"]
        points[serverless_label(start_s)] = series
        print(f"  serverless, {start_s:g} s start: done", flush=True)
    return points


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--values", type=float, nargs="+", default=list(MODEL_COUNTS))
    parser.add_argument("--starts", type=float, nargs="+", default=list(STARTS_S))
    parser.add_argument("--plot", default="docs/sim-serverless-start.png")
    args = parser.parse_args()
    points = run(args.values, args.starts)
    print(sweep_table("models", points, DEFAULT_ATTAINMENT_TARGET))
    title = "aegaeon against serverless with each engine start per scale-up (faint: strict)"
    print(f"plot written to {plot_sweep('models', points, args.plot, DEFAULT_ATTAINMENT_TARGET, title)}")


if __name__ == "__main__":
    main()
