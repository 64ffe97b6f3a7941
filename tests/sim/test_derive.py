from __future__ import annotations

import pytest

from aegaeon.sim.catalog import load_catalog
from aegaeon.sim.derive import Efficiency, derive_bundled_profiles, derive_profile
from aegaeon.sim.models import load_bundled_profiles


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
