"""Models in the device arena: the active one and a prefetched next one always find room together.

What the engine relies on: a model is loaded byte for byte; with room for two models, a prefetch
beside the active model succeeds whatever order the models were loaded in (the victim is whichever
other model is there, and whatever the models' sizes); the active model is never evicted by a
prefetch; smaller models stay resident together where they fit; a model's weights only ever start
at one of a few fixed addresses; the arena's high-water mark never moves.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from aegaeon.config import MEMORY_ALIGNMENT
from aegaeon.memory.arena import DeviceArena
from aegaeon.memory.copies import CopyStream
from aegaeon.memory.loader import ModelLoader, ResidentModels
from aegaeon.memory.model_cache import HostModelCache, plan_layout, tensor_views

SHAPES = {"w": (64, 16)}
MODEL_BYTES = plan_layout(SHAPES, torch.float32)[1]
KV_BYTES = 4 * MEMORY_ALIGNMENT


def filled_with(value: float):
    """A fill of the host cache that sets every weight to `value`."""

    def fill(entry, model, progress):
        for view in tensor_views(entry, 0, model).values():
            view.fill_(value)

    return fill


def residents_for(tmp_path, models: int) -> tuple[ResidentModels, dict]:
    cache = HostModelCache.create(tmp_path, 3 * MODEL_BYTES)
    cached = {
        key: cache.acquire(key, SHAPES, torch.float32, filled_with(seed), False, pin=False)
        for seed, key in enumerate("abc", start=1)
    }
    arena = DeviceArena(KV_BYTES + models * MODEL_BYTES, "cpu")
    arena.allocate(KV_BYTES)
    loader = ModelLoader(arena, cache, CopyStream(arena.device), MODEL_BYTES)
    return ResidentModels(arena, loader, largest=MODEL_BYTES), cached


def test_a_loaded_model_holds_its_weights(tmp_path):
    residents, cached = residents_for(tmp_path, 2)
    entry = residents.use(cached["b"])
    entry.copy.wait()
    assert torch.equal(entry.tensors["w"], torch.full((64, 16), 2.0))


def test_a_prefetch_beside_the_active_model_fits_whatever_the_load_order(tmp_path):
    residents, cached = residents_for(tmp_path, 2)
    high_water = residents.arena.stats().high_water
    residents.use(cached["b"])
    residents.use(cached["a"])  # a is active, loaded after b (in a stack, b would sit below it)
    keep = frozenset({"a"})
    assert residents.room_keeping(keep) >= MODEL_BYTES
    residents.load(cached["c"], keep, background=True).copy.wait()
    assert residents.get("a") is not None and residents.get("c") is not None and residents.get("b") is None
    assert residents.arena.stats().high_water == high_water


def test_with_room_for_one_model_a_prefetch_is_refused_and_the_active_model_stays(tmp_path):
    residents, cached = residents_for(tmp_path, 1)
    residents.use(cached["a"])
    assert residents.room_keeping(frozenset({"a"})) < MODEL_BYTES
    residents.use(cached["b"])  # a switch may evict anything
    assert residents.get("b") is not None and residents.get("a") is None


# Three sizes, the largest twice the smallest (rows of 16 float32s): first-fit left the active model
# where the next one did not fit beside it.
ROWS = {"s1": 16, "s2": 16, "s3": 16, "m1": 24, "m2": 24, "b1": 48, "b2": 48}
CYCLES = (["s1", "m1", "b1", "s2", "m2", "b2", "s3"], ["b1", "s1", "m1", "s2", "b2", "m2", "s3"])


def sized_residents_for(tmp_path) -> tuple[ResidentModels, dict]:
    """An arena with room for two copies of the largest model, as the engine sizes it on a CPU."""
    nbytes = {key: plan_layout({"w": (rows, 16)}, torch.float32)[1] for key, rows in ROWS.items()}
    cache = HostModelCache.create(tmp_path, sum(nbytes.values()))
    cached = {
        key: cache.acquire(key, {"w": (rows, 16)}, torch.float32, filled_with(seed), False, pin=False)
        for seed, (key, rows) in enumerate(ROWS.items(), start=1)
    }
    arena = DeviceArena(KV_BYTES + 2 * max(nbytes.values()), "cpu")
    arena.allocate(KV_BYTES)
    loader = ModelLoader(arena, cache, CopyStream(arena.device), MODEL_BYTES)
    return ResidentModels(arena, loader, largest=max(nbytes.values())), cached


def value_of(key: str) -> float:
    return float(list(ROWS).index(key) + 1)


@pytest.mark.parametrize("order", CYCLES)
def test_a_prefetch_beside_the_active_model_always_fits_with_models_of_three_sizes(tmp_path, order):
    residents, cached = sized_residents_for(tmp_path)
    sequence = order * 4
    for active, following in itertools.pairwise(sequence):
        residents.use(cached[active]).copy.wait()
        keep = frozenset({active})
        assert residents.room_keeping(keep) >= cached[following].nbytes, (active, following)
        residents.load(cached[following], keep, background=True).copy.wait()
        # The active model is still there, its weights untouched by the prefetch's copy.
        for key in (active, following):
            assert torch.equal(residents.get(key).tensors["w"], torch.full((ROWS[key], 16), value_of(key)))


def test_small_models_stay_resident_together(tmp_path):
    residents, cached = sized_residents_for(tmp_path)
    for key in ("s1", "s2", "s3", "m1"):
        residents.use(cached[key]).copy.wait()
    # Four models in two slots of the largest: each of them takes half a slot.
    assert sorted(entry.key for entry in residents.entries) == ["m1", "s1", "s2", "s3"]
    assert residents.evictions == 0
    assert residents.room_keeping(frozenset({"m1"})) >= cached["b1"].nbytes


def test_models_only_ever_start_at_fixed_addresses_and_keep_their_weights(tmp_path):
    residents, cached = sized_residents_for(tmp_path)
    rng = random.Random(5)
    seen: dict[str, set[int]] = {key: set() for key in ROWS}
    active = None
    for _ in range(300):
        key = rng.choice(list(ROWS))
        if active is not None and rng.random() < 0.5:  # a prefetch beside the active model
            keep = frozenset({active})
            residents.load(cached[key], keep, background=True).copy.wait()
        else:
            residents.use(cached[key]).copy.wait()
            active = key
        for entry in residents.entries:
            fixed = residents.addresses(entry.nbytes)
            assert entry.offset in fixed
            start = entry.tensors["w"].data_ptr() - residents.arena.buffer.data_ptr()
            assert start == entry.offset
            assert torch.equal(entry.tensors["w"], torch.full((ROWS[entry.key], 16), value_of(entry.key)))
            seen[entry.key].add(entry.offset)
    assert residents.evictions > 50
    # Two slots: a model of a whole slot has two addresses, one of a half four (any of them used).
    assert all(len(addresses) <= 4 for addresses in seen.values())
    assert len(seen["b1"]) == 2 and max(len(addresses) for addresses in seen.values()) == 4
