from __future__ import annotations

import math

import pytest

from aegaeon.config import SchedulerConfig
from aegaeon.scheduler.decode import plan_quotas
from aegaeon.scheduler.timeline import EventKind
from aegaeon.sim.cluster import NodeLayout
from aegaeon.sim.events import EventLoop
from aegaeon.sim.policies import aegaeon
from aegaeon.sim.policies.base import SimContext
from aegaeon.sim.runner import simulate, to_requests
from tests.sim.helpers import GB, arrivals, cluster, toy_models

STEP_S = 0.01
SWITCH_S = 0.5


def _run(workload, models, pool, config: SchedulerConfig | None = None):
    """Build the deployment by hand (to read its timelines) and run the workload to the end."""
    loop = EventLoop()
    context = SimContext(loop, models, pool, config or SchedulerConfig(), {m: 1.0 for m in models})
    deployment = aegaeon.build(context)
    requests = to_requests(workload, models)
    for request in requests:
        loop.call_at(request.arrival_s, lambda r=request: deployment.submit(r))
    loop.run()
    return deployment, requests


def test_decode_turns_follow_the_round_quota() -> None:
    """Two models on one decode instance that holds one model's weights at a time: every turn is
    switched in (c = 2 switches per round), and each emits the formula's q/d tokens plus the uncharged
    first step."""
    models = toy_models(["a", "b"], step_s=STEP_S, switch_s=SWITCH_S)
    # 1.5 models of room: the other model is never resident, so each round pays both switches.
    pool = cluster(NodeLayout(prefill=1, decode=1), device_bytes=int(1.6 * GB), kv_bytes=GB // 10)
    workload = arrivals((0.0, "a", 16, 3000), (0.0, "b", 16, 3000))
    # Switches may take up to half a round: the floor (lowered to S / (1 − 0.5) = 0.4) binds.
    config = SchedulerConfig(max_switch_share=0.5)
    deployment, requests = _run(workload, models, pool, config)
    quotas, alpha, _, _ = plan_quotas([STEP_S, STEP_S], [0.1, 0.1], 2 * SWITCH_S, config)
    assert alpha == pytest.approx(0.4)  # c / (n · QMAX) + S = 1/10 + 0.2 is under it
    expected = 1 + math.ceil(quotas[0] / STEP_S - 1e-9)
    decode = deployment.nodes[0].instances[1]
    turns = decode.timeline.of_kind(EventKind.DECODE_TURN)
    # The live loop's smoothed turn costs start from the first, switch-free turn and converge on the
    # switch time within a few dozen rounds.
    steady = [t.tokens for t in turns[40:-2]]
    assert len(steady) > 50
    assert all(abs(tokens - expected) <= 1 for tokens in steady), (expected, steady[:10])
    # Token-level interleaving: the models alternate turn by turn, each switched in with a full load.
    models = [t.model for t in turns[40:-2]]
    assert set(models) == {"a", "b"} and all(x != y for x, y in zip(models, models[1:], strict=False))
    assert decode.timeline.interleaved("a") and decode.timeline.interleaved("b")
    loads = [e for e in decode.timeline.of_kind(EventKind.SWITCH) if e.detail == "loaded"]
    assert all(e.duration_s == pytest.approx(SWITCH_S) for e in loads[2:])
    assert all(r.generated == 3000 for r in requests)


def test_resident_models_are_loaded_once() -> None:
    """With room for both models' weights, each is copied in once; later switches are free."""
    models = toy_models(["a", "b"], step_s=STEP_S, switch_s=SWITCH_S)
    pool = cluster(NodeLayout(prefill=1, decode=1), device_bytes=10 * GB, kv_bytes=GB)
    deployment, requests = _run(arrivals((0.0, "a", 16, 3000), (0.0, "b", 16, 3000)), models, pool)
    decode = deployment.nodes[0].instances[1]
    switches = decode.timeline.of_kind(EventKind.SWITCH)
    assert decode.weights.loads == 2  # one switched in, the other prefetched beside it
    # The first switch to the prefetched model may wait for its copy to land; later ones are free.
    assert len(switches) > 10 and all(e.duration_s == 0 for e in switches[3:])
    assert decode.timeline.interleaved("a") and decode.timeline.interleaved("b")
    # Free switches: both requests finish far sooner than with a load per turn.
    assert max(r.finished_s for r in requests) < 2 * 3000 * STEP_S + 4 * SWITCH_S


@pytest.mark.parametrize("device", ["cpu", "toy"])
def test_a_prefetch_takes_the_loops_time_only_on_a_cpu(device: str) -> None:
    """Three models, weight room for two: every turn prefetches the next model beside the active one.
    A GPU copies beside the decode steps; a CPU has no copy engine, so there the loop waits out each
    copy, as the live engine's inline copies make it."""
    models = toy_models(["a", "b", "c"], step_s=STEP_S, switch_s=SWITCH_S, device=device)
    pool = cluster(NodeLayout(prefill=1, decode=1), device_bytes=int(2.2 * GB), kv_bytes=GB // 10)
    deployment, requests = _run(arrivals(*[(0.0, m, 16, 1200) for m in "abc"]), models, pool)
    decode = deployment.nodes[0].instances[1]
    prefetches = len(decode.timeline.of_kind(EventKind.PREFETCH))
    assert prefetches > 10 and decode.weights.loads > 10
    waited = decode.busy_s["switch"]
    if device == "cpu":
        assert waited == pytest.approx(decode.weights.loads * SWITCH_S)
    else:
        assert waited < decode.weights.loads * SWITCH_S / 2
    assert all(r.generated == 1200 for r in requests)


def test_kv_moves_through_the_host_pool_between_prefill_and_decode() -> None:
    models = toy_models(["a"], kv_block_bytes=10**6)
    pool = cluster(NodeLayout(prefill=1, decode=1))
    # The prefill makes the first token: 1599 + 1 tokens of KV, 100 blocks.
    deployment, requests = _run(arrivals((1.0, "a", 1599, 10)), models, pool)
    prefill, decode = deployment.nodes[0].instances
    # 100 blocks of 1 MB over the 2 GB/s link implied by the profile (1 GB in 0.5 s).
    assert prefill.busy_s["export"] == pytest.approx(100 * 10**6 / 2e9)
    assert decode.timeline.of_kind(EventKind.SWAP_IN)
    assert requests[0].token_times[0] == pytest.approx(1.0 + SWITCH_S + 0.02)


def test_aegaeon_serves_many_models_on_few_devices() -> None:
    models = toy_models([f"m{i}" for i in range(8)], switch_s=0.05)
    pool = cluster(NodeLayout(prefill=1, decode=2), device_bytes=3 * GB, kv_bytes=GB // 2)
    workload = arrivals(*[(0.3 * i, f"m{i % 8}", 100, 200) for i in range(40)])
    result = simulate("aegaeon", workload, models, pool)
    assert result.report.num_finished == 40
    assert result.attainment > 0.95
    assert result.notes["models_per_node"] == [8]
