"""KV moves: all of a sequence's blocks between a device KV region and the host KV pool in one call.

What a user relies on: every block lands byte for byte where it was sent, however scattered the
blocks are on either side (pool slabs of several shapes after churn, device blocks in any order),
large moves included (those are split among threads); a handle that is not an allocated block of
the region's shape is refused before anything is copied.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from aegaeon.config import MIB
from aegaeon.memory.copies import (
    COPY_CHUNK_BYTES,
    PARALLEL_COPY_MIN_BYTES,
    STREAM_COPY_MIN_BYTES,
    CopyJob,
    CopyStream,
    block_runs,
)
from aegaeon.memory.kv_pool import HostKVPool, KVShape

SLAB = 1 * MIB
REPO_ROOT = Path(__file__).resolve().parents[2]
DEVICE_BLOCKS = 96


@pytest.fixture
def pool() -> Iterator[HostKVPool]:
    directory = Path(tempfile.mkdtemp(prefix="aegaeon-kv-moves-test-", dir="/dev/shm"))
    pool = HostKVPool.create(directory, "kv", 24 * SLAB, SLAB)
    yield pool
    pool.close()
    shutil.rmtree(directory, ignore_errors=True)


def kv_region(shape: KVShape, blocks: int, seed: int) -> torch.Tensor:
    """A device KV region `[blocks, layers, 2, 16, kv_heads, head_dim]` of distinct random values."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((blocks, *shape.block_shape), generator=generator).to(shape.torch_dtype)


def scattered_handles(pool: HostKVPool, shape: KVShape, count: int, rng: random.Random) -> list[int]:
    """`count` blocks of `shape` spread over several slabs with gaps, beside blocks of other shapes."""
    other = KVShape(1, 2, 16, "float16")
    held = [pool.allocate(rng.choice((shape, other)), rng.randint(1, 6)) for _ in range(30)]
    for handles in held[::2]:  # free every other allocation: holes in every slab
        pool.free(handles)
    handles = pool.allocate(shape, count)
    rng.shuffle(handles)
    return handles


def test_block_runs_join_blocks_consecutive_on_both_sides() -> None:
    def runs(targets: list[int], sources: list[int]) -> list[list[int]]:
        return block_runs(targets, sources, 10).tolist()

    assert runs([0, 10, 20, 50, 60], [100, 110, 120, 130, 140]) == [[0, 100, 30], [50, 130, 20]]
    assert runs([0, 10], [10, 0]) == [[0, 10, 10], [10, 0, 10]]  # consecutive on one side only
    assert runs([30, 20], [0, 10]) == [[30, 0, 10], [20, 10, 10]]  # never backwards
    assert runs([0, 10, 30, 40], [50, 60, 70, 80]) == [[0, 50, 20], [30, 70, 20]]  # a gap on one side
    assert runs([5], [7]) == [[5, 7, 10]]
    assert runs([], []) == []
    with pytest.raises(ValueError):
        block_runs([0, 10], [0], 10)


@pytest.mark.parametrize(
    ("shape", "count"),
    [
        (KVShape(2, 2, 32, "bfloat16"), 20),  # small blocks: one thread
        (KVShape(4, 4, 64, "float32"), 48),  # 128 KiB blocks, 6 MiB: split among threads
        (KVShape(4, 4, 64, "float32"), PARALLEL_COPY_MIN_BYTES // (128 * 1024) + 1),  # just over the split
    ],
)
def test_blocks_round_trip_byte_for_byte_however_scattered(pool: HostKVPool, shape, count) -> None:
    rng = random.Random(count)
    copies = CopyStream(torch.device("cpu"))
    kv = kv_region(shape, DEVICE_BLOCKS, seed=count)
    original = kv.clone()
    handles = scattered_handles(pool, shape, count, rng)
    # Device blocks: a consecutive run (one copy where the pool's blocks are consecutive too) and
    # scattered ones in any order.
    blocks = [
        *range(10, 10 + count // 2),
        *rng.sample(range(10 + count // 2, DEVICE_BLOCKS), count - count // 2),
    ]
    pool.copy_from_device(copies, handles, kv, blocks).synchronize()
    for handle, block in zip(handles, blocks, strict=True):
        assert torch.equal(pool.view(handle, shape), original[block])

    kv.zero_()
    back = rng.sample(range(DEVICE_BLOCKS), count)
    pool.copy_to_device(copies, handles, kv, back).synchronize()
    for handle, block in zip(handles, back, strict=True):
        assert torch.equal(kv[block], pool.view(handle, shape))
    untouched = sorted(set(range(DEVICE_BLOCKS)) - set(back))
    assert not kv[untouched].any()  # nothing beyond the named blocks was written


def test_a_large_copy_in_the_background_lands_when_waited_for() -> None:
    source = torch.randn(3 * PARALLEL_COPY_MIN_BYTES // 4 + 5, generator=torch.Generator().manual_seed(2))
    target = torch.zeros_like(source)
    copy = CopyStream(torch.device("cpu")).copy([(target, source)], background=True)
    copy.wait()
    assert copy.done() and torch.equal(target, source)


@pytest.mark.parametrize("total", [STREAM_COPY_MIN_BYTES // 3, STREAM_COPY_MIN_BYTES + 12_345])
def test_a_copy_job_lands_every_byte_of_unaligned_runs_and_nothing_else(total: int) -> None:
    """Runs of odd sizes at odd offsets, several chunks each (streamed stores above the threshold)."""
    rng = random.Random(total)
    generator = torch.Generator().manual_seed(5)
    source = torch.randint(1, 256, (total + 4096,), dtype=torch.uint8, generator=generator)
    target = torch.zeros(2 * total + 8192, dtype=torch.uint8)
    ranges, expected, read, written = [], torch.zeros_like(target), 3, 1
    while read < total:
        nbytes = min(rng.randint(1, 3 * COPY_CHUNK_BYTES // 2), total - read)
        ranges.append((target.data_ptr() + written, source.data_ptr() + read, nbytes))
        expected[written : written + nbytes] = source[read : read + nbytes]
        read, written = read + nbytes + rng.randint(0, 70), written + nbytes + rng.randint(1, 70)
    job = CopyJob(ranges)
    helpers = [threading.Thread(target=job.run, args=(True,)) for _ in range(2)]
    for helper in helpers:
        helper.start()
    job.run(helper=False)
    assert torch.equal(target, expected)  # before joining: the caller's run waits for started helpers
    for helper in helpers:
        helper.join()
    # A helper scheduled after the job was done finds nothing left to copy.
    target.zero_()
    job.run(helper=True)
    assert not target.any()


def test_without_a_compiler_copies_still_land(tmp_path: Path) -> None:
    """A failing compiler leaves a warning and copies on the calling thread, not a broken copy."""
    code = (
        "import logging, torch; logging.basicConfig()\n"
        "from aegaeon.memory.copies import CopyStream\n"
        "source = torch.randn(3 << 20); target = torch.zeros_like(source)\n"
        "CopyStream(torch.device('cpu')).copy([(target, source)])\n"
        "print('equal', torch.equal(target, source))\n"
    )
    env = {**os.environ, "CC": "false", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    assert "equal True" in proc.stdout
    assert "building the CPU copy kernel failed" in proc.stderr


def test_bad_moves_are_refused_before_anything_is_copied(pool: HostKVPool) -> None:
    shape = KVShape(2, 2, 32, "float32")
    copies = CopyStream(torch.device("cpu"))
    kv = kv_region(shape, 8, seed=1)
    before = kv.clone()
    handles = pool.allocate(shape, 3)
    freed = pool.allocate(shape, 1)
    pool.free(freed)
    [other_shape] = pool.allocate(KVShape(2, 2, 32, "float16"), 1)

    def refused(handles: list[int], blocks: list[int], match: str, region: torch.Tensor = kv) -> None:
        with pytest.raises(ValueError, match=match):
            pool.copy_to_device(copies, handles, region, blocks)
        assert torch.equal(kv, before)

    refused([*handles[:2], freed[0]], [0, 1, 2], "not allocated")
    refused([handles[0], other_shape], [0, 1], "does not have shape")
    refused([handles[0], handles[0] + 8], [0, 1], "not the start of a block")
    refused([handles[0], handles[0]], [0, 1], "same block twice")
    refused(handles, [0, 1, 1], "same block twice")
    refused(handles, [0, 1, 8], "not all below 8")
    refused(handles, [0, 1], "3 host KV blocks for 2 device blocks")
    refused(handles, [0, 1, 2], "contiguous", region=kv.transpose(0, 1))
    pool.free(handles)
    refused(handles, [0, 1, 2], "not allocated")
