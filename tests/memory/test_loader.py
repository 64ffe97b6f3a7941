"""Models in the device arena: the active one and a prefetched next one always find room together.

What the engine relies on: a model is loaded byte for byte; with room for two models, a prefetch
beside the active model succeeds whatever order the models were loaded in (the victim is whichever
other model is there); the active model is never evicted by a prefetch; the arena's high-water mark
never moves.
"""

from __future__ import annotations

import torch

from aegaeon.config import MEMORY_ALIGNMENT
from aegaeon.memory.arena import DeviceArena
from aegaeon.memory.copies import CopyStream
from aegaeon.memory.loader import ModelLoader, ResidentModels
from aegaeon.memory.model_cache import HostModelCache, plan_layout

SHAPES = {"w": (64, 16)}
MODEL_BYTES = plan_layout(SHAPES, torch.float32)[1]
KV_BYTES = 4 * MEMORY_ALIGNMENT


def residents_for(tmp_path, models: int) -> tuple[ResidentModels, dict]:
    cache = HostModelCache.create(tmp_path, 3 * MODEL_BYTES)
    cached = {
        key: cache.load(
            key, SHAPES, torch.float32, lambda seed=seed: {"w": torch.full((64, 16), seed)}, False
        )
        for seed, key in enumerate("abc", start=1)
    }
    arena = DeviceArena(KV_BYTES + models * MODEL_BYTES, "cpu")
    arena.allocate(KV_BYTES)
    return ResidentModels(arena, ModelLoader(arena, cache, CopyStream(arena.device), MODEL_BYTES)), cached


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
