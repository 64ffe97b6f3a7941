from __future__ import annotations

import pytest

from aegaeon.sim.device import ResidentWeights, SlotWeights

SIZES = {"big": 60, "small": 30, "mid": 40}


def _stack(capacity: int = 100) -> ResidentWeights:
    return ResidentWeights(capacity, SIZES.__getitem__, lambda m: SIZES[m] / 10)


def test_loads_go_one_after_another_over_the_link() -> None:
    weights = _stack()
    first = weights.load("big", now=0.0)
    second = weights.load("small", now=1.0)
    assert first.ready_s == 6.0
    assert second.ready_s == 9.0  # waited for the first copy
    assert weights.load("big", now=20.0) is first  # resident: no copy


def test_models_go_first_fit_and_the_most_recently_used_is_evicted_like_the_engine_arena() -> None:
    weights = _stack()
    weights.load("small", 0.0)  # 0-30
    weights.load("mid", 0.0)  # 30-70 (70 of 100)
    weights.load("big", 0.0)  # no gap of 60: evicts mid, the most recently used; big at 30-90
    assert weights.models() == ["small", "big"]
    # Beside the active "big" the gaps are 30 and 10 bytes even with "small" gone: no room for "mid".
    assert not weights.prefetch("mid", 0.0, active="big")
    with pytest.raises(ValueError, match="does not fit"):
        _stack(capacity=50).load("big", 0.0)


def test_a_model_below_the_active_one_is_evicted_for_a_prefetch() -> None:
    sizes = {"a": 50, "b": 50, "c": 50}
    weights = ResidentWeights(100, sizes.__getitem__, lambda m: 1.0)
    weights.load("a", 0.0)  # 0-50
    weights.load("b", 0.0)  # 50-100, then active
    assert weights.prefetch("c", 0.0, active="b")  # a stack could not free "a" below "b"
    assert sorted(weights.models()) == ["b", "c"]


def test_slots_replace_the_least_recently_used_so_prefetch_always_fits() -> None:
    weights = SlotWeights(120, SIZES.__getitem__, lambda m: 1.0, slot_bytes=60)
    weights.load("small", 0.0)
    weights.load("big", 0.0)
    weights.touch("small")
    assert weights.prefetch("mid", 0.0, active="small")  # evicts big, the least recently used
    assert sorted(weights.models()) == ["mid", "small"]
