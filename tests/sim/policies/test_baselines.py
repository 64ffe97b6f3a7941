from __future__ import annotations

import pytest

from aegaeon.sim.cluster import NodeLayout
from aegaeon.sim.policies.dedicated import assign_gpus
from aegaeon.sim.policies.mux import place_models
from aegaeon.sim.policies.serverless import DEFAULT_STARTUP_S, ServerlessOptions
from aegaeon.sim.runner import SimOptions, simulate
from aegaeon.sim.workload import WorkloadConfig, generate_workload
from tests.sim.helpers import GB, arrivals, cluster, toy_models


def _pool(gpus: int, device_bytes: int = 10 * GB):
    return cluster(*[NodeLayout(colocated=1)] * gpus, device_bytes=device_bytes)


def test_dedicated_with_ample_gpus_meets_every_slo() -> None:
    workload = generate_workload(WorkloadConfig(num_models=4, rate_per_model=0.5, duration_s=60, seed=1))
    models = toy_models([f"m{i}" for i in range(4)])
    result = simulate("dedicated", workload, models, _pool(8))
    assert result.attainment == pytest.approx(1.0)
    assert result.strict_attainment == pytest.approx(1.0)
    assert result.report.num_finished == len(workload)
    assert result.notes == {"models_served": 4, "models_unserved": 0}


def test_dedicated_without_a_gpu_per_model_fails_the_rest() -> None:
    workload = arrivals((0.0, "a", 10, 5), (0.0, "b", 10, 5), (0.1, "c", 10, 5))
    result = simulate("dedicated", workload, toy_models(["a", "b", "c"]), _pool(2))
    assert result.report.num_failed == 1
    assert result.notes["models_unserved"] == 1


def test_assign_gpus_gives_spares_to_the_busiest_per_replica() -> None:
    assert assign_gpus({"a": 3.0, "b": 1.0}, 4) == {"a": 3, "b": 1}
    assert assign_gpus({"a": 1.0, "b": 2.0, "c": 3.0}, 2) == {"c": 1, "b": 1}


NO_ENGINE_START = SimOptions(serverless=ServerlessOptions(startup_s=0.0))


def test_serverless_fails_requests_not_started_within_the_timeout() -> None:
    """One GPU, a long request of model a, then one of model b: b waits for the GPU and times out."""
    models = toy_models(["a", "b"], step_s=0.01, switch_s=1.0)
    workload = arrivals((0.0, "a", 10, 3000), (1.0, "b", 10, 10), (2.0, "a", 10, 10))
    result = simulate("serverless", workload, models, _pool(1), options=NO_ENGINE_START)
    a_long, b, a_short = result.requests
    assert b.failed and b.finished_s == pytest.approx(1.0 + 15.0)
    assert not b.token_times
    assert a_long.generated == 3000 and a_short.generated == 10  # a joins the loaded instance
    assert result.notes["timed_out"] == 1
    # With a shorter first request, b gets the GPU once it is idle: a load, then its prefill.
    quick = arrivals((0.0, "a", 10, 100), (1.0, "b", 10, 10))
    result = simulate("serverless", quick, models, _pool(1), options=NO_ENGINE_START)
    a, b = result.requests
    assert not b.failed
    assert b.token_times[0] == pytest.approx(a.finished_s + 1.0 + 0.02)


def test_serverless_timeout_is_a_knob() -> None:
    models = toy_models(["a", "b"], step_s=0.01, switch_s=1.0)
    workload = arrivals((0.0, "a", 10, 3000), (1.0, "b", 10, 10))
    options = SimOptions(serverless=ServerlessOptions(timeout_s=100.0, startup_s=0.0))
    result = simulate("serverless", workload, models, _pool(1), options=options)
    assert not result.requests[1].failed


def test_serverless_loads_pay_the_engine_start_by_default() -> None:
    """Each scale-up starts a new engine (vLLM's measured start) on top of the weight copy."""
    models = toy_models(["a", "b"], step_s=0.01, prefill_s=0.02, switch_s=1.0)
    workload = arrivals((0.0, "a", 10, 5), (20.0, "b", 10, 5))
    a, b = simulate("serverless", workload, models, _pool(1)).requests
    assert a.token_times[0] == pytest.approx(DEFAULT_STARTUP_S + 1.0 + 0.02)
    # b replaces a on the GPU (a is idle by then), so it pays a whole start again.
    assert b.token_times[0] == pytest.approx(20.0 + DEFAULT_STARTUP_S + 1.0 + 0.02)
    # A start longer than the timeout leaves a cold model's first request no chance.
    slow = SimOptions(serverless=ServerlessOptions(startup_s=30.0))
    late = simulate("serverless", arrivals((0.0, "a", 10, 5)), models, _pool(1), options=slow)
    assert late.requests[0].failed and late.notes["timed_out"] == 1


def test_mux_places_models_within_memory_and_leaves_the_rest_unserved() -> None:
    placed = place_models({"a": 3.0, "b": 2.0, "c": 1.0, "d": 0.5}, {"a": 5, "b": 5, "c": 5, "d": 9}, 2, 10)
    assert placed == [["a", "c"], ["b"]] or placed == [["a"], ["b", "c"]]
    assert all(sum({"a": 5, "b": 5, "c": 5, "d": 9}[m] for m in gpu) <= 10 for gpu in placed)
    assert "d" not in {m for gpu in placed for m in gpu}
    models = toy_models(["a", "b", "c"], weight_bytes=4 * GB)
    workload = arrivals((0.0, "a", 10, 5), (0.0, "b", 10, 5), (0.0, "c", 10, 5))
    # 10 GB arenas keeping 20% for KV hold two 4 GB models each: all three fit on two GPUs, not one.
    assert simulate("mux", workload, models, _pool(2)).notes["models_unserved"] == 0
    assert simulate("mux", workload, models, _pool(1)).notes["models_unserved"] == 1


def test_batching_engine_tokens_come_a_step_apart() -> None:
    models = toy_models(["a"], step_s=0.01, prefill_s=0.02)
    result = simulate("dedicated", arrivals((5.0, "a", 10, 4)), models, _pool(1))
    assert result.requests[0].token_times == pytest.approx([5.02, 5.03, 5.04, 5.05])
