from __future__ import annotations

import itertools

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


def test_models_leave_room_for_the_largest_and_the_most_recently_used_is_evicted_like_the_engine() -> None:
    weights = _stack(capacity=120)  # two copies of "big"
    weights.load("small", 0.0)  # 0-30: leaves 90 free above
    weights.load("mid", 0.0)  # 60-100, not first-fit's 30-70: it leaves 60 free below
    assert weights.get("mid").offset == 60
    weights.load("big", 0.0)  # no free 60 beside the others: evicts mid, the most recently used
    assert weights.models() == ["small", "big"] and weights.get("big").offset == 60
    # Beside the active "big" the 60 below it is the prefetch's, once "small" is evicted.
    assert weights.prefetch("mid", 0.0, active="big")
    assert sorted(weights.models()) == ["big", "mid"]
    with pytest.raises(ValueError, match="does not fit"):
        _stack(capacity=50).load("big", 0.0)


# Three sizes, the largest twice the smallest: first-fit stranded the active model where the next
# one did not fit beside it (9 of the 34 prefetches of the first cycle below failed).
CYCLE_SIZES = {"s1": 20, "s2": 20, "s3": 20, "m1": 30, "m2": 30, "b1": 60, "b2": 60}
CYCLES = (["s1", "m1", "b1", "s2", "m2", "b2", "s3"], ["b1", "s1", "m1", "s2", "b2", "m2", "s3"])


@pytest.mark.parametrize("order", CYCLES)
def test_a_prefetch_beside_the_active_model_always_fits_with_models_of_three_sizes(order) -> None:
    weights = ResidentWeights(120, CYCLE_SIZES.__getitem__, lambda m: 1.0)  # two copies of the largest
    sequence = order * 5
    for active, following in itertools.pairwise(sequence):
        weights.load(active, 0.0)
        weights.touch(active)
        assert weights.prefetch(following, 0.0, active=active), (active, following, weights.models())
        assert weights.is_resident(active)


def test_small_models_stay_resident_together() -> None:
    weights = ResidentWeights(120, CYCLE_SIZES.__getitem__, lambda m: 1.0)
    for model in ("s1", "s2", "s3", "m1"):
        weights.load(model, 0.0)
        weights.touch(model)
    # Four models in room for two of the largest; the slots arena would hold two.
    assert sorted(weights.models()) == ["m1", "s1", "s2", "s3"]
    assert weights.prefetch("b1", 0.0, active="m1")  # and the largest still fits beside the active one


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
