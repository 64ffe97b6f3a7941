from __future__ import annotations

import pytest

from aegaeon.sim.breakdown import COMPONENTS, DECODE, KV, PREFILL, QUEUE, SWITCH, WAIT, shares
from aegaeon.sim.cluster import NodeLayout
from aegaeon.sim.runner import simulate
from tests.sim.helpers import GB, arrivals, cluster, toy_models

STEP_S = 0.01
PREFILL_S = 0.02
SWITCH_S = 0.5


def test_a_lone_request_pays_two_loads_its_prefill_and_its_steps() -> None:
    """One request on a 1 prefill + 1 decode node: its prefill instance and its decode instance each
    load the model once; the rest of its latency is the prefill and 99 decode steps."""
    models = toy_models(["a"], step_s=STEP_S, prefill_s=PREFILL_S, switch_s=SWITCH_S)
    result = simulate("aegaeon", arrivals((1.0, "a", 16, 100)), models, cluster(NodeLayout(1, 1)))
    (request,) = result.requests
    parts = result.breakdown
    assert set(parts) == set(COMPONENTS)
    assert parts[SWITCH] == pytest.approx(2 * SWITCH_S)
    assert parts[PREFILL] == pytest.approx(PREFILL_S)
    assert parts[DECODE] == pytest.approx(99 * STEP_S)
    assert parts[QUEUE] == pytest.approx(0.0, abs=1e-9) and parts[WAIT] == pytest.approx(0.0, abs=1e-9)
    assert sum(parts.values()) == pytest.approx(request.finished_s - request.arrival_s)
    assert sum(shares(parts).values()) == pytest.approx(1.0)


def test_requests_of_two_models_wait_for_each_others_turns() -> None:
    """Two models that cannot both be resident on one decode instance: each request waits through the
    other's turns and pays its own switches and KV swaps; the parts still add up to its latency."""
    models = toy_models(
        ["a", "b"], step_s=STEP_S, prefill_s=PREFILL_S, switch_s=SWITCH_S, kv_block_bytes=10**6
    )
    pool = cluster(NodeLayout(prefill=1, decode=1), device_bytes=int(1.6 * GB), kv_bytes=GB // 10)
    result = simulate("aegaeon", arrivals((0.0, "a", 16, 500), (0.0, "b", 16, 500)), models, pool)
    parts = result.breakdown
    assert parts[WAIT] > 2 * SWITCH_S and parts[KV] > 0 and parts[SWITCH] > 2 * SWITCH_S
    # The second request prefilled waits in the queue for the first's prefill and the switch between.
    assert parts[QUEUE] > 0
    latency = sum(r.finished_s - r.arrival_s for r in result.requests) / 2
    assert sum(parts.values()) == pytest.approx(latency)
    assert result.to_dict()["latency_breakdown_s"] == parts
