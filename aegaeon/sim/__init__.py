"""Simulator and capacity planner: the scheduler package against baselines, on a latency model.

Start from `Scenario` (devices, layout, model kinds, knobs) and a workload (`generate_workload` or
`read_trace`), then `Scenario.run(policy, arrivals)`; `plan.plan` finds the fewest GPUs. See
docs/simulation.md.
"""

from aegaeon.sim.result import SimResult
from aegaeon.sim.runner import POLICIES, SimOptions, simulate
from aegaeon.sim.scenario import Scenario
from aegaeon.sim.trace import read_trace, write_trace
from aegaeon.sim.workload import Arrival, LengthConfig, WorkloadConfig, generate_workload

__all__ = [
    "POLICIES",
    "Arrival",
    "LengthConfig",
    "Scenario",
    "SimOptions",
    "SimResult",
    "WorkloadConfig",
    "generate_workload",
    "read_trace",
    "simulate",
    "write_trace",
]
