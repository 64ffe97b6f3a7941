from __future__ import annotations

import pytest

from aegaeon.sim.catalog import load_catalog
from aegaeon.sim.derive import (
    ARTIFACT_HOST_LINK_EFFICIENCY,
    Efficiency,
    all_reduce_costs,
    derive_bundled_profiles,
    derive_profile,
)
from aegaeon.sim.models import load_bundled_profiles
from aegaeon.sim.scenario import Scenario


def test_bundled_file_is_what_the_derivation_gives() -> None:
    assert load_bundled_profiles().to_dict() == derive_bundled_profiles().to_dict()


def test_derived_h100_numbers_are_in_the_published_range() -> None:
    catalog = load_catalog()
    gpu = catalog.gpu("H100")
    qwen = derive_profile(catalog.model("Qwen2.5-7B"), gpu)
    llama = derive_profile(catalog.model("Llama-2-13B"), gpu)
    # Batch-1 decode of a 7B model on an H100 is a few milliseconds (weights / HBM bandwidth).
    assert 0.005 < qwen.predict_decode([1000]) < 0.012
    assert qwen.predict_decode([1000]) < llama.predict_decode([1000])
    # A 700-token prompt takes tens of milliseconds; a switch from host memory under a second.
    assert 0.01 < qwen.predict_prefill([700]) < 0.06
    assert 0.3 < qwen.switch_s < llama.switch_s < 1.0
    assert qwen.device == gpu.device and qwen.dtype == "bfloat16"


def test_efficiency_scales_the_roofline() -> None:
    catalog = load_catalog()
    shape, gpu = catalog.model("Qwen2.5-7B"), catalog.gpu("H100")
    slow = derive_profile(shape, gpu, Efficiency(memory=0.375, step_overhead_s=0.0))
    fast = derive_profile(shape, gpu, Efficiency(memory=0.75, step_overhead_s=0.0))
    assert slow.decode[0] == pytest.approx(2 * fast.decode[0])
    with pytest.raises(ValueError):
        Efficiency(memory=0)


def test_switch_time_is_the_weights_over_the_link_share() -> None:
    catalog = load_catalog()
    shape, gpu = catalog.model("Llama-2-13B"), catalog.gpu("H100")
    default = derive_profile(shape, gpu)
    # 26 GB over half of 64 GB/s: 0.81 s; at the artifact's share the 3-5 s its planner estimates.
    assert default.switch_s == pytest.approx(shape.weight_bytes("bfloat16") / 32e9)
    artifact = derive_profile(shape, gpu, Efficiency(host_link=ARTIFACT_HOST_LINK_EFFICIENCY))
    assert 3.0 < artifact.switch_s <= 5.5
    assert artifact.switch_s == pytest.approx(default.switch_s * 0.5 / ARTIFACT_HOST_LINK_EFFICIENCY)
    with pytest.raises(ValueError):
        Efficiency(host_link=1.5)


def test_a_scenario_rederives_the_bundled_profiles_at_its_link_share() -> None:
    models = Scenario(link_efficiency=0.25).model_set(["a"])
    bundled = Scenario().model_set(["a"])
    assert models.profiles["a"].switch_s == pytest.approx(2 * bundled.profiles["a"].switch_s)
    # Twice the KV move time too: weights and KV share the copy link.
    assert models.kv_move_s("a", 1000) == pytest.approx(2 * bundled.kv_move_s("a", 1000))
    with pytest.raises(ValueError, match="profile file"):
        Scenario(link_efficiency=0.25, profiles="any.json").model_set(["a"])


def test_a_tensor_parallel_switch_copies_one_kth_per_rank() -> None:
    catalog = load_catalog()
    shape, gpu = catalog.model("Qwen2.5-72B"), catalog.gpu("H100")
    whole = derive_profile(shape, gpu)
    for tp in (2, 4, 8):
        # Every rank copies its shard over its own link, all at once: the switch takes 1/k as long.
        assert derive_profile(shape, gpu, tp=tp).switch_s == pytest.approx(whole.switch_s / tp)


def test_a_tensor_parallel_step_is_the_roofline_over_k_plus_its_all_reduces() -> None:
    catalog = load_catalog()
    shape, gpu = catalog.model("Qwen2.5-72B"), catalog.gpu("H100")
    efficiency = Efficiency()
    whole, tp4 = derive_profile(shape, gpu), derive_profile(shape, gpu, tp=4)
    per_step, per_token = all_reduce_costs(shape, gpu, 4, efficiency)
    # Two all-reduces per layer, 80 layers: a fixed cost per step and a per-token one over NVLink.
    assert per_step == pytest.approx(2 * 80 * efficiency.all_reduce_latency_s)
    assert per_token == pytest.approx(2 * 80 * 1.5 * 8192 * 2 / (gpu.nvlink_bytes_per_s * efficiency.nvlink))
    weight_read = whole.decode[0] - efficiency.step_overhead_s
    assert tp4.decode[0] == pytest.approx(efficiency.step_overhead_s + weight_read / 4 + per_step)
    assert tp4.decode[1] == pytest.approx(whole.decode[1] / 4)
    assert tp4.decode[2] == pytest.approx(whole.decode[2] / 4 + per_token)
    # A 72B decode step at TP 4 on H100s: tens of milliseconds, slower than a quarter of TP 1's.
    assert whole.predict_decode([1000]) / 4 < tp4.predict_decode([1000]) < 0.03
    assert all_reduce_costs(shape, gpu, 1, efficiency) == (0.0, 0.0)
