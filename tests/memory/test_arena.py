"""The device arena: a bump allocator whose views are the arena's own bytes."""

from __future__ import annotations

import pytest
import torch

from aegaeon.config import MEMORY_ALIGNMENT, MemoryConfig
from aegaeon.memory.arena import ArenaFullError, DeviceArena


def test_allocations_are_aligned_and_disjoint():
    arena = DeviceArena(4096, "cpu")
    offsets = [arena.allocate(size) for size in (1, 3, 17, 100, 16)]
    assert all(offset % MEMORY_ALIGNMENT == 0 for offset in offsets)
    ends = [offset + size for offset, size in zip(offsets, (1, 3, 17, 100, 16), strict=True)]
    assert all(end <= start for end, start in zip(ends, offsets[1:], strict=False))


def test_views_are_the_arena_bytes_not_copies():
    arena = DeviceArena(1024, "cpu")
    a = arena.tensor((4, 8), torch.float32)
    b = arena.tensor((3,), torch.bfloat16)
    a.fill_(1.5)
    b.fill_(-2.0)
    assert a.data_ptr() == arena.buffer.data_ptr()
    assert b.data_ptr() == arena.buffer.data_ptr() + 128
    again = arena.view(0, (32,), torch.float32)
    assert torch.equal(again, torch.full((32,), 1.5))
    assert torch.equal(arena.view(128, (3,), torch.bfloat16), b)


def test_full_arena_refuses_clearly_and_allocates_nothing():
    arena = DeviceArena(256, "cpu")
    arena.allocate(200)
    with pytest.raises(ArenaFullError, match="cpu_arena_bytes"):
        arena.allocate(100)
    assert arena.top == 208


def test_scope_release_and_reset_keep_the_high_water_mark():
    arena = DeviceArena(1024, "cpu")
    arena.allocate(64)
    with arena.scope():
        arena.allocate(512)
        assert arena.stats().used == 576
    assert arena.stats().used == 64
    mark = arena.top
    arena.allocate(32)
    arena.release(mark)
    assert arena.top == mark
    arena.reset()
    assert arena.stats().used == 0
    assert arena.stats().high_water == 576
    with pytest.raises(ValueError):
        arena.release(100)


def test_unaligned_or_out_of_range_views_are_refused():
    arena = DeviceArena(256, "cpu")
    with pytest.raises(ValueError):
        arena.view(8, (2,), torch.float32)
    with pytest.raises(ValueError):
        arena.view(240, (8,), torch.float32)


def test_cpu_arena_size_comes_from_config_or_the_default():
    assert DeviceArena.for_device("cpu", MemoryConfig(), cpu_bytes=1000).capacity == 1008
    assert DeviceArena.for_device("cpu", MemoryConfig(cpu_arena_bytes=4096), cpu_bytes=1000).capacity == 4096
