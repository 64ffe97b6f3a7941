"""Default sizes of the memory tiers: host pools from the machine's memory, the KV region from the arena."""

from __future__ import annotations

import os

import pytest
import torch

from aegaeon.config import BLOCK_SIZE, GIB, MIB, EngineConfig, MemoryConfig, build_serve_config
from aegaeon.engine.architecture import Architecture, RopeScaling
from aegaeon.engine.engine import LLMEngine
from aegaeon.engine.kv_cache import kv_block_bytes
from aegaeon.engine.residency import weight_bytes
from aegaeon.memory.sizing import HostSizes, available_host_bytes, device_kv_bytes, host_sizes

# Llama-2-13B's shape.
LLAMA_13B = Architecture(
    family="llama",
    vocab_size=32000,
    hidden_size=5120,
    num_layers=40,
    num_heads=40,
    num_kv_heads=40,
    head_dim=128,
    intermediate_size=13824,
    rms_norm_eps=1e-5,
    rope=RopeScaling(theta=10000.0),
    max_position=4096,
)
# What an 80 GB device (H100/A100-80GB) reports free once a CUDA context exists on it.
FREE_ON_80GB = 79 * GIB


def test_an_80gb_device_gives_a_13b_model_32k_tokens_of_context():
    weights = weight_bytes(LLAMA_13B, torch.float16)
    assert 25e9 < weights < 27e9
    # What DeviceArena.for_device takes on CUDA.
    arena = int(FREE_ON_80GB * MemoryConfig().device_memory_fraction)
    kv = device_kv_bytes(arena, weights)
    assert arena - kv >= 2 * weights  # room for the active model and a prefetched one
    tokens = kv // kv_block_bytes(LLAMA_13B, torch.float16) * BLOCK_SIZE
    assert tokens >= 32 * 1024


def test_an_arena_too_small_for_two_models_says_what_to_change():
    with pytest.raises(ValueError, match="kv_cache_bytes"):
        device_kv_bytes(3 * GIB, 2 * GIB)


def test_host_pools_share_the_available_memory_by_default():
    memory = MemoryConfig(kv_slab_bytes=GIB)
    sizes = host_sizes(memory, available=100 * GIB)
    budget = 100 * GIB * memory.host_memory_fraction
    assert sizes.kv_pool_bytes % GIB == 0
    assert sizes.kv_pool_bytes == int(budget * memory.host_kv_pool_fraction) // GIB * GIB
    assert sizes.model_cache_bytes + sizes.kv_pool_bytes == int(budget)
    # Memory for less than a slab (a container's small /dev/shm): a pool of one smaller slab.
    small = host_sizes(memory, available=GIB)
    assert 0 < small.kv_pool_bytes < GIB and small.model_cache_bytes > 0
    # An engine on its own holds at most what its models need.
    assert host_sizes(memory, 100 * GIB, models_bytes=3 * GIB).model_cache_bytes == 3 * GIB


def test_host_pool_settings_win_and_a_pool_leaving_no_room_is_refused():
    set_both = MemoryConfig(host_model_cache_bytes=5 * GIB, host_kv_pool_bytes=7 * GIB)
    assert host_sizes(set_both, available=GIB) == HostSizes(model_cache_bytes=5 * GIB, kv_pool_bytes=7 * GIB)
    with pytest.raises(ValueError, match="host_model_cache_bytes"):
        host_sizes(MemoryConfig(host_kv_pool_bytes=90 * GIB), available=100 * GIB)


def test_available_memory_is_bounded_by_the_shared_memory_directory(tmp_path):
    available = available_host_bytes(tmp_path)
    stat = os.statvfs(tmp_path)
    assert 0 < available <= stat.f_bavail * stat.f_frsize


def test_the_tier_settings_come_from_yaml_settings():
    config = build_serve_config(
        {
            "models": ["m=/x"],
            "host_memory_fraction": 0.5,
            "host_kv_pool_fraction": 0.1,
            "disk_read_threads": 3,
            "host_cache_wait_s": 2.5,
        }
    )
    memory = config.node.memory
    assert (memory.host_memory_fraction, memory.host_kv_pool_fraction) == (0.5, 0.1)
    assert (memory.disk_read_threads, memory.host_cache_wait_s) == (3, 2.5)
    with pytest.raises(ValueError, match="host_memory_fraction"):
        MemoryConfig(host_memory_fraction=1.5)


def test_a_cpu_arena_of_given_size_gives_its_kv_region_what_the_models_leave(demo_model_dirs):
    path = demo_model_dirs["llama"]
    arch = Architecture.from_pretrained(path)
    weights = weight_bytes(arch, torch.float32)
    arena = 2 * weights + 8 * MIB
    engine = LLMEngine(path, memory=MemoryConfig(cpu_arena_bytes=arena), progress=False)
    served = engine.model()
    assert engine.residency.kv_bytes == device_kv_bytes(engine.residency.arena.capacity, weights)
    assert served.num_blocks == engine.residency.kv_bytes // kv_block_bytes(arch, torch.float32)
    assert served.max_model_len == min(arch.max_position, served.num_blocks * BLOCK_SIZE)
    # Set explicitly, the KV region is what is asked for.
    engine = LLMEngine(path, config=EngineConfig(kv_cache_bytes=MIB), progress=False)
    assert engine.residency.kv_bytes == MIB
