"""How large the memory tiers are when the configuration does not say: from the machine itself.

Host: the node's two shared pools (the host model cache and the host KV pool, both files on
`shm_dir`) take `host_memory_fraction` of the host memory available at start, the smaller of the
kernel's MemAvailable and the free space of `shm_dir` (a tmpfs may be smaller than the memory);
the KV pool gets `host_kv_pool_fraction` of that, the model cache the rest. An engine on its own
caps its cache at what its models need.

Device: the arena holds the KV region and room for the largest model twice (the active one and a
prefetched next one); the KV region gets what that leaves, and `max_model_len` follows from it.

Pure functions of their inputs except `available_host_bytes`, which reads the machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from aegaeon.config import MEMORY_ALIGNMENT, RESIDENT_MODELS_ON_DEVICE, MemoryConfig
from aegaeon.memory.placement import slot_size

MEMINFO = Path("/proc/meminfo")


@dataclass(frozen=True)
class HostSizes:
    """Bytes of a node's host model cache and host KV pool."""

    model_cache_bytes: int
    kv_pool_bytes: int


def available_host_bytes(shm_dir: str | Path) -> int:
    """Host memory a node may fill now: MemAvailable, bounded by the free space of `shm_dir`."""
    memory = None
    if MEMINFO.is_file():
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                memory = int(line.split()[1]) * 1024
                break
    if memory is None:
        memory = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    shm = os.statvfs(shm_dir)
    return min(memory, shm.f_bavail * shm.f_frsize)


def host_sizes(memory: MemoryConfig, available: int, models_bytes: int | None = None) -> HostSizes:
    """The host pools' sizes: those set in `memory`, the others from `available` bytes of host memory.

    `models_bytes`: what an engine on its own needs for all its models (its cache holds no more);
    None for a node, whose models may change while it serves.
    """
    budget = int(available * memory.host_memory_fraction)
    kv_pool = memory.host_kv_pool_bytes
    if kv_pool is None:
        share = int(budget * memory.host_kv_pool_fraction)
        # Whole slabs; a share under one slab is a pool of one smaller slab (HostKVPool.create), so a
        # small machine or container still starts.
        kv_pool = share // memory.kv_slab_bytes * memory.kv_slab_bytes or share
    cache = memory.host_model_cache_bytes
    if cache is None:
        cache = budget - kv_pool
        if models_bytes is not None:
            cache = min(cache, models_bytes)
        if cache < MEMORY_ALIGNMENT:
            raise ValueError(
                f"the host KV pool ({kv_pool} bytes) leaves no room for the host model cache in "
                f"{budget} bytes ({memory.host_memory_fraction} of {available} available): set "
                "host_model_cache_bytes, or lower host_kv_pool_bytes"
            )
    return HostSizes(model_cache_bytes=cache, kv_pool_bytes=kv_pool)


def device_kv_bytes(
    arena_bytes: int, largest_model_bytes: int, resident_models: int = RESIDENT_MODELS_ON_DEVICE
) -> int:
    """Bytes of the KV region in an arena of `arena_bytes` that keeps room for `resident_models`
    copies of the largest model (each in a slot of `slot_size` bytes)."""
    weights = resident_models * slot_size(largest_model_bytes)
    kv = (arena_bytes - weights) // MEMORY_ALIGNMENT * MEMORY_ALIGNMENT
    if kv < MEMORY_ALIGNMENT:
        raise ValueError(
            f"the device arena ({arena_bytes} bytes) has no room for KV beside {resident_models} copies "
            f"of the largest model ({largest_model_bytes} bytes each): raise device_memory_fraction or "
            "cpu_arena_bytes, or set kv_cache_bytes"
        )
    return kv
