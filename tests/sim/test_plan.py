from __future__ import annotations

import pytest

from aegaeon.sim.plan import fewest_gpus, plan
from aegaeon.sim.scenario import Scenario
from aegaeon.sim.workload import Arrival, WorkloadConfig, generate_workload


class FakeResult:
    def __init__(self, attainment: float) -> None:
        self.attainment = attainment


@pytest.mark.parametrize("needed", [1, 2, 3, 7, 8, 9, 100])
def test_fewest_gpus_finds_the_exact_minimum(needed: int) -> None:
    calls = []

    def run(n: int) -> FakeResult:
        calls.append(n)
        return FakeResult(1.0 if n >= needed else 0.5)

    gpus, tried, _ = fewest_gpus(run, 0.9, max_gpus=512)
    assert gpus == needed
    assert len(calls) == len(set(calls)) <= 2 * max(needed, 2).bit_length() + 1


def test_fewest_gpus_gives_up_at_the_maximum_and_checks_its_inputs() -> None:
    assert fewest_gpus(lambda n: FakeResult(0.0), 0.9, max_gpus=20)[0] is None
    with pytest.raises(ValueError):
        fewest_gpus(lambda n: FakeResult(1.0), 1.5)


def test_plan_answers_grow_with_the_target_and_the_load() -> None:
    """Dedicated needs a GPU per model; aegaeon's answer grows monotonically with the traffic."""
    scenario = Scenario()
    # Every model gets the same share: without its own GPU, a model's requests (1/6 of all) fail.
    light = [Arrival(1.0 * i, f"m{i % 6}", 700, 290) for i in range(120)]
    heavy = generate_workload(WorkloadConfig(num_models=6, rate_per_model=0.6, duration_s=120, seed=4))
    dedicated = plan(light, scenario, ["dedicated"], 0.9, max_gpus=32)[0]
    assert dedicated.gpus == 6
    assert all(att < 0.9 for n, att in dedicated.tried.items() if n < 6)
    light_gpus = plan(light, scenario, ["aegaeon"], 0.9, max_gpus=32)[0].gpus
    heavy_gpus = plan(heavy, scenario, ["aegaeon"], 0.9, max_gpus=32)[0].gpus
    assert light_gpus is not None and heavy_gpus is not None
    assert 1 <= light_gpus <= heavy_gpus <= 6


def test_plan_counts_whole_tensor_parallel_instances() -> None:
    """72B models on TP=4 instances: every count tried is a multiple of 4 devices."""
    scenario = Scenario(kinds=("Qwen2.5-72B",), mix=None)
    arrivals = generate_workload(WorkloadConfig(num_models=2, rate_per_model=0.1, duration_s=60))
    (answer,) = plan(arrivals, scenario, ["aegaeon"], 0.9, max_gpus=16)
    assert answer.gpus is not None and answer.gpus % 4 == 0
    assert answer.tried and all(n % 4 == 0 for n in answer.tried)
    with pytest.raises(ValueError, match="do not split into instances of 4"):
        plan(arrivals, Scenario(gpus_per_node=6, kinds=("Qwen2.5-72B",), mix=None), ["aegaeon"], 0.9)
