from __future__ import annotations

import pytest

from aegaeon.sim.catalog import load_catalog
from aegaeon.sim.scenario import Scenario
from aegaeon.sim.workload import WorkloadConfig, generate_workload

TP72 = Scenario(gpus=8, kinds=("Qwen2.5-72B",), mix=None)


def test_a_tp4_instance_uses_four_devices_and_holds_a_quarter_of_each_model() -> None:
    assert TP72.tp() == 4
    models = TP72.model_set(["a", "b"])
    pool = TP72.cluster(models.device)
    # Eight devices: one prefill and one decode instance of four devices each.
    assert pool.describe() == "1P+1D TP4"
    assert (pool.gpus, pool.engines) == (8, 2)
    shape = load_catalog().model("Qwen2.5-72B")
    assert models.weight_bytes("a") == pytest.approx(shape.weight_bytes("bfloat16") / 4, abs=1)
    # Each rank's KV region is what its device leaves beside two shards (about 5 GB on an H100).
    memory = pool.memory.aegaeon_split(models.largest_weight_bytes())
    assert 2e9 < memory.kv_bytes < 10e9


def test_the_72b_scenario_runs_on_tp4_instances() -> None:
    arrivals = generate_workload(WorkloadConfig(num_models=2, rate_per_model=0.1, duration_s=120))
    models = TP72.model_set(sorted({a.model for a in arrivals}))
    result = TP72.run("aegaeon", arrivals, models)
    assert result.gpus == 8 and result.layout == "1P+1D TP4"
    assert result.report.num_finished == len(arrivals) and result.attainment > 0.9
    # Each simulated instance keeps its four devices busy: utilisation is per device.
    assert 0 < result.utilisation <= 1
    assert result.notes["models_per_node"] == [2]
    serverless = TP72.run("serverless", arrivals, models)
    assert serverless.gpus == 8 and serverless.layout == "8 GPUs as 2 TP4 engines"


def test_per_node_device_counts_and_clear_errors() -> None:
    scenario = Scenario(node_devices=(8, 8, 4), kinds=("Qwen2.5-72B",), mix=None)
    assert scenario.gpus == 20
    assert scenario.cluster(scenario.device_name()).describe() == "1P+1D TP4 + 1P+1D TP4 + 1C TP4"
    with pytest.raises(ValueError, match="one tensor parallel size"):
        Scenario(kinds=("Qwen2.5-72B", "Qwen2.5-7B"), mix=None).tp()
    with pytest.raises(ValueError, match="do not split over 3"):
        Scenario(kinds=("Qwen2.5-72B",), mix=None, tensor_parallel_size=3).tp()
    with pytest.raises(ValueError, match="shard the model over more devices"):
        whole = Scenario(kinds=("Qwen2.5-72B",), mix=None, tensor_parallel_size=1)
        models = whole.model_set(["a"])
        whole.cluster(models.device).memory.aegaeon_split(models.largest_weight_bytes())
    with pytest.raises(ValueError, match="profile file"):
        Scenario(tensor_parallel_size=2, profiles="any.json").profile_store()
