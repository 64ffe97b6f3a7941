"""The host model cache: models laid out contiguously in shared memory, LRU eviction, many processes."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
import torch

from aegaeon.config import MEMORY_ALIGNMENT
from aegaeon.memory.model_cache import HostModelCache, ModelCacheFullError, plan_layout, tensor_views

SHAPES = {"embed": (10, 6), "norm": (6,), "odd": (3, 3)}
MODEL_BYTES = plan_layout(SHAPES, torch.float32)[1]


def state(seed: float) -> dict[str, torch.Tensor]:
    """Distinct, recognisable tensors for every name in SHAPES."""
    return {
        name: seed + torch.arange(torch.Size(shape).numel(), dtype=torch.float32).view(shape)
        for name, shape in SHAPES.items()
    }


class Reader:
    """Fills a model's entry with `state(seed)`, counting how often it is asked."""

    def __init__(self, seed: float):
        self.seed = seed
        self.calls = 0

    def __call__(self, entry: torch.Tensor, model, progress) -> None:
        self.calls += 1
        views = tensor_views(entry, 0, model)
        for name, tensor in state(self.seed).items():
            views[name].copy_(tensor)
        progress(model.nbytes)


@pytest.fixture()
def make_cache(tmp_path):
    caches = []

    def make(models: int) -> HostModelCache:
        cache = HostModelCache.create(tmp_path, models * MODEL_BYTES, name=f"cache-{len(caches)}")
        caches.append(cache)
        return cache

    yield make
    for cache in caches:
        cache.close()


def test_a_model_is_one_aligned_contiguous_range(make_cache):
    cache = make_cache(2)
    model = cache.acquire("a", SHAPES, torch.float32, Reader(1.0), progress=False, pin=False)
    assert model.nbytes == MODEL_BYTES
    assert all(slot.offset % MEMORY_ALIGNMENT == 0 for slot in model.tensors)
    assert [slot.name for slot in model.tensors] == list(SHAPES)
    views = tensor_views(cache.buffer, model.offset, model)
    for name, tensor in state(1.0).items():
        assert torch.equal(views[name], tensor)
    # The last tensor ends inside the model's range: copying the range copies the whole model.
    last = model.tensors[-1]
    assert last.offset + 9 * 4 <= model.nbytes


def test_region_and_index_are_owner_only(make_cache):
    cache = make_cache(1)
    for path in (cache.region.path, cache.index_path):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_loading_twice_reads_the_checkpoint_once(make_cache):
    cache = make_cache(2)
    reader = Reader(2.0)
    first = cache.acquire("a", SHAPES, torch.float32, reader, progress=False, pin=False)
    second = cache.acquire("a", SHAPES, torch.float32, reader, progress=False, pin=False)
    assert first == second and reader.calls == 1


def test_least_recently_used_unpinned_model_is_evicted(make_cache):
    cache = make_cache(2)
    cache.acquire("a", SHAPES, torch.float32, Reader(1.0), progress=False, pin=False)
    cache.acquire("b", SHAPES, torch.float32, Reader(2.0), progress=False, pin=False)
    cache.get("a")  # a is now more recently used than b
    cache.acquire("c", SHAPES, torch.float32, Reader(3.0), progress=False, pin=False)
    assert cache.get("b") is None
    assert cache.get("a") is not None and cache.get("c") is not None
    assert cache.stats().evictions == 1
    views = tensor_views(cache.buffer, cache.get("c").offset, cache.get("c"))
    assert torch.equal(views["embed"], state(3.0)["embed"])


def test_pinned_models_stay_and_a_full_cache_says_what_to_raise(make_cache):
    cache = make_cache(2)
    cache.acquire("a", SHAPES, torch.float32, Reader(1.0), progress=False, pin=False)
    cache.acquire("b", SHAPES, torch.float32, Reader(2.0), progress=False, pin=False)
    cache.pin("a")
    cache.acquire("c", SHAPES, torch.float32, Reader(3.0), progress=False, pin=False)
    assert cache.get("a") is not None and cache.get("b") is None
    cache.pin("c")
    with pytest.raises(ModelCacheFullError, match="host_model_cache_bytes"):
        cache.acquire("d", SHAPES, torch.float32, Reader(4.0), progress=False, pin=False)
    cache.unpin("c")
    cache.acquire("d", SHAPES, torch.float32, Reader(4.0), progress=False, pin=False)
    assert cache.get("c") is None and cache.get("a") is not None


def test_a_model_larger_than_the_cache_is_refused(make_cache):
    cache = make_cache(1)
    big = {"embed": (1000, 1000)}
    with pytest.raises(ModelCacheFullError, match="host_model_cache_bytes"):
        cache.acquire("big", big, torch.float32, Reader(0.0), progress=False, pin=False)


def test_another_process_maps_the_same_models(make_cache):
    cache = make_cache(2)
    cache.acquire("a", SHAPES, torch.float32, Reader(5.0), progress=False, pin=False)
    script = f"""
import torch
from aegaeon.memory.model_cache import HostModelCache, tensor_views
cache = HostModelCache.attach({str(cache.region.path.parent)!r}, {cache.name!r})
model = cache.get("a")
views = tensor_views(cache.buffer, model.offset, model)
views["norm"].add_(100)
print(float(views["embed"][0, 0]))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert float(out.stdout) == 5.0
    model = cache.get("a")
    assert torch.equal(tensor_views(cache.buffer, model.offset, model)["norm"], state(5.0)["norm"] + 100)
