"""The host KV pool: a slab allocator of KV blocks in shared memory, used by several processes."""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from queue import Empty

import pytest
import torch

from aegaeon.config import MEMORY_ALIGNMENT
from aegaeon.memory.kv_pool import HostKVPool, HostKVPoolFullError, KVShape

# Blocks of 8192, 6144 and 6144 bytes: 32, 42 and 42 of them in a 256 KiB slab.
SHAPE_A = KVShape(2, 2, 16, torch.float32)
SHAPE_B = KVShape(3, 1, 32, torch.float16)
SHAPE_C = KVShape(1, 4, 24, torch.bfloat16)
SLAB = 256 * 1024
# Steps each of two processes allocates and frees at once in the cross-process test.
CHURN_STEPS = 3000


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="aegaeon-kv-pool-test-", dir="/dev/shm"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def pool(shm_dir: Path) -> Iterator[HostKVPool]:
    pool = HostKVPool.create(shm_dir, "kv", 8 * SLAB, SLAB)
    yield pool
    pool.close()


def pattern(nbytes: int, tag: int) -> torch.Tensor:
    """Bytes that start with `tag` (an int64) and go on with a sequence that depends on it."""
    data = (torch.arange(nbytes, dtype=torch.int64) * 31 + tag).remainder(256).to(torch.uint8)
    data[:8] = torch.tensor([tag], dtype=torch.int64).view(torch.uint8)
    return data


def fill(pool: HostKVPool, handle: int, shape: KVShape, tag: int) -> None:
    """Write the pattern of `tag` over every byte of a block (through its typed view)."""
    pool.view(handle, shape).reshape(-1).view(torch.uint8).copy_(pattern(shape.block_bytes, tag))


def holds(pool: HostKVPool, handle: int, shape: KVShape, tag: int) -> bool:
    """Whether a block still holds, byte for byte, what `fill` wrote there."""
    return torch.equal(
        pool.view(handle, shape).reshape(-1).view(torch.uint8), pattern(shape.block_bytes, tag)
    )


def slab_of(pool: HostKVPool, handle: int) -> int:
    """Which slab a block is in: blocks of one slab lie within `slab_bytes` of each other."""
    return (handle - pool.region.nbytes + pool.capacity_bytes) // pool.slab_bytes


# --- shapes and the region --------------------------------------------------------------------


def test_shape_key_is_deterministic_and_tells_shapes_apart():
    assert KVShape(2, 2, 16, "float32") == SHAPE_A and KVShape(2, 2, 16, "float32").key == SHAPE_A.key
    keys = {shape.key for shape in (SHAPE_A, SHAPE_B, SHAPE_C, KVShape(2, 2, 16, torch.float16))}
    assert len(keys) == 4 and all(0 < key < 2**63 for key in keys)
    assert SHAPE_A.block_shape == (2, 2, 16, 2, 16) and SHAPE_A.block_bytes == 2 * 2 * 16 * 2 * 16 * 4
    with pytest.raises(ValueError, match="not supported"):
        KVShape(1, 1, 8, torch.complex64)
    with pytest.raises(ValueError, match="layers"):
        KVShape(0, 1, 8, "float16")


def test_region_is_owner_only_and_closing_the_owner_removes_it(shm_dir: Path):
    pool = HostKVPool.create(shm_dir, "kv", 2 * SLAB, SLAB)
    path = shm_dir / "kv"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert pool.capacity_bytes == 2 * SLAB and pool.region.nbytes > 2 * SLAB  # state lives in front
    with pytest.raises(FileExistsError):
        HostKVPool.create(shm_dir, "kv", 2 * SLAB, SLAB)
    other = HostKVPool.attach(shm_dir, "kv")
    other.close()
    assert path.exists()  # an instance detaching leaves the node's pool alone
    pool.close()
    assert not path.exists()


def test_bad_settings_and_foreign_files_are_refused(shm_dir: Path):
    with pytest.raises(ValueError, match="host_kv_pool_bytes"):
        HostKVPool.create(shm_dir, "small", 16, SLAB)
    with pytest.raises(ValueError, match="kv_slab_bytes"):
        HostKVPool.create(shm_dir, "odd", 4 * SLAB, SLAB + 8)
    (shm_dir / "junk").write_bytes(b"\x01" * 4096)
    with pytest.raises(ValueError, match="not a host KV pool"):
        HostKVPool.attach(shm_dir, "junk")


def test_view_is_a_typed_block_in_shared_memory(shm_dir: Path, pool: HostKVPool):
    [handle] = pool.allocate(SHAPE_B, 1)
    block = pool.view(handle, SHAPE_B)
    assert block.shape == (3, 2, 16, 1, 32) and block.dtype == torch.float16 and block.is_contiguous()
    assert handle % MEMORY_ALIGNMENT == 0 and block.data_ptr() % MEMORY_ALIGNMENT == 0
    assert block.data_ptr() == pool.region.tensor.data_ptr() + handle  # a view, not a copy
    block.fill_(3.5)
    other = HostKVPool.attach(shm_dir, "kv")  # another mapping of the same file sees the write
    assert bool((other.view(handle, SHAPE_B) == 3.5).all())
    with pytest.raises(ValueError, match="does not have shape"):
        other.view(handle, SHAPE_C)
    del block
    other.close()


# --- allocation -------------------------------------------------------------------------------


def test_mixed_shapes_share_the_pool_without_overlap(pool: HostKVPool):
    rng = random.Random(1)
    blocks: dict[int, tuple[KVShape, int]] = {}
    for round_ in range(3):
        for _ in range(40):  # interleave shapes so they compete for slabs
            shape = rng.choice((SHAPE_A, SHAPE_B, SHAPE_C))
            for handle in pool.allocate(shape, rng.randint(1, 5)):
                assert handle not in blocks
                blocks[handle] = (shape, len(blocks) + 1)
                fill(pool, handle, shape, blocks[handle][1])
            if pool.stats().slabs_in_use == pool.num_slabs:
                break
        # No two blocks share a byte ...
        spans = sorted((handle, handle + shape.block_bytes) for handle, (shape, _) in blocks.items())
        assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:], strict=False))
        # ... every block still holds its own pattern ...
        assert all(holds(pool, handle, shape, tag) for handle, (shape, tag) in blocks.items())
        # ... and each slab holds one shape only.
        shapes_in_slab: dict[int, set[KVShape]] = {}
        for handle, (shape, _) in blocks.items():
            shapes_in_slab.setdefault(slab_of(pool, handle), set()).add(shape)
        assert all(len(shapes) == 1 for shapes in shapes_in_slab.values())
        stats = pool.stats()
        assert stats.allocated_bytes == sum(shape.block_bytes for shape, _ in blocks.values())
        for shape in (SHAPE_A, SHAPE_B, SHAPE_C):
            count = sum(1 for s, _ in blocks.values() if s == shape)
            assert stats.blocks_per_shape.get(shape, 0) == count
            slab_count = sum(1 for shapes in shapes_in_slab.values() if shape in shapes)
            assert stats.slabs_per_shape.get(shape, 0) == slab_count
        pool.validate()
        # Free a random half (round 2: of what is left) and go again.
        doomed = rng.sample(sorted(blocks), len(blocks) // 2)
        pool.free(doomed)
        for handle in doomed:
            del blocks[handle]
        assert all(holds(pool, handle, shape, tag) for handle, (shape, tag) in blocks.items()), round_


def test_exhaustion_raises_a_clear_error_and_allocates_nothing(pool: HostKVPool):
    held = pool.allocate(SHAPE_A, 7 * 32 + 30)  # 7 full slabs of A and 30 of the 8th slab's 32 blocks
    before = pool.stats()
    with pytest.raises(HostKVPoolFullError) as error:
        pool.allocate(SHAPE_A, 3)
    message = str(error.value)
    assert "3 blocks" in message and "2 free blocks" in message and "0 of 8 slabs" in message
    assert "host_kv_pool_bytes" in message
    # Another shape finds no free slab even though A's slabs have room: the error says so too.
    with pytest.raises(HostKVPoolFullError, match="0 free blocks"):
        pool.allocate(SHAPE_B, 1)
    assert pool.stats() == before  # nothing was taken, not even the 2 blocks that were free
    pool.validate()
    assert len(pool.allocate(SHAPE_A, 2)) == 2
    pool.free(held[:32])  # blocks come lowest first: these are all of slab 0, which is returned
    assert pool.stats().slabs_in_use == 7
    with pytest.raises(HostKVPoolFullError, match="43 blocks"):
        pool.allocate(SHAPE_B, 43)  # a free slab holds 42 of them
    assert pool.stats().slabs_in_use == 7  # the all-or-nothing check kept the free slab free
    assert len(pool.allocate(SHAPE_B, 42)) == 42


def test_allocate_each_gives_every_count_its_own_blocks_or_none_where_the_pool_is_full(pool: HostKVPool):
    """Several requests' blocks under one lock: as many allocations in turn, a full pool answering
    None for a request (which is then recomputed) and still serving smaller ones after it."""
    each = pool.allocate_each(SHAPE_A, [5, 0, 40])
    assert [len(handles) for handles in each] == [5, 0, 40]
    assert len({handle for handles in each for handle in handles}) == 45
    pool.validate()
    held = pool.allocate(SHAPE_A, 6 * 32)  # 45 + 192 of 256 blocks of A: 19 left
    each = pool.allocate_each(SHAPE_A, [10, 12, 9, 0])  # 10 fit, 12 then do not, 9 still do
    assert [None if handles is None else len(handles) for handles in each] == [10, None, 9, 0]
    assert pool.stats().allocated_bytes == 256 * SHAPE_A.block_bytes
    with pytest.raises(ValueError, match="cannot allocate"):
        pool.allocate_each(SHAPE_A, [1, -1])
    pool.free(held)
    pool.free([handle for handles in each if handles for handle in handles])
    pool.validate()


def test_a_block_larger_than_a_slab_is_refused(shm_dir: Path):
    with HostKVPool.create(shm_dir, "tiny", 4 * 4096, 4096) as pool:
        with pytest.raises(ValueError, match="kv_slab_bytes") as error:
            pool.allocate(SHAPE_A, 1)  # 8192 bytes
        assert "8192" in str(error.value)
        assert len(pool.allocate(KVShape(1, 1, 32, "float32"), 1)) == 1  # 4096 bytes: exactly one slab


def test_bad_handles_raise_value_error_and_free_nothing(pool: HostKVPool):
    handles = pool.allocate(SHAPE_A, 3)
    before = pool.stats()
    for bad in (
        [handles[0], 7],  # far outside the data
        [handles[0], handles[1] + 16],  # inside a block, not its start
        [handles[0], handles[0] + pool.slab_bytes],  # in a slab that is free
        [handles[0], handles[0]],  # twice in one call
        [handles[0], handles[2] + SHAPE_A.block_bytes],  # the free block after the last one
    ):
        with pytest.raises(ValueError):
            pool.free(bad)
        assert pool.stats() == before  # the good handle in the call was not freed either
    pool.free(handles[:1])
    with pytest.raises(ValueError, match="not allocated"):
        pool.free(handles[:1])  # double free
    with pytest.raises(ValueError, match="not allocated"):
        pool.view(handles[0], SHAPE_A)
    with pytest.raises(ValueError):
        pool.allocate(SHAPE_A, -1)
    assert pool.allocate(SHAPE_A, 0) == []
    pool.validate()


def test_empty_slabs_are_returned_and_taken_by_another_shape(pool: HostKVPool):
    a = pool.allocate(SHAPE_A, 8 * 32)  # A takes every slab
    assert pool.stats().slabs_per_shape == {SHAPE_A: 8} and pool.stats().utilisation == 1.0
    with pytest.raises(HostKVPoolFullError):
        pool.allocate(SHAPE_B, 1)
    by_slab: dict[int, list[int]] = {}
    for handle in a:
        by_slab.setdefault(slab_of(pool, handle), []).append(handle)
    pool.free(by_slab[3][:-1])  # a slab with one block left stays A's
    assert pool.stats().slabs_per_shape == {SHAPE_A: 8}
    pool.free(by_slab[3][-1:] + by_slab[5])  # now slabs 3 and 5 are empty: returned
    stats = pool.stats()
    assert stats.slabs_per_shape == {SHAPE_A: 6} and stats.slabs_in_use == 6
    b = pool.allocate(SHAPE_B, 84)  # exactly two slabs of B
    assert {slab_of(pool, handle) for handle in b} == {3, 5}
    assert pool.stats().slabs_per_shape == {SHAPE_A: 6, SHAPE_B: 2}
    for handle in b:
        fill(pool, handle, SHAPE_B, 1)
    pool.free([handle for slab, handles in by_slab.items() if slab not in (3, 5) for handle in handles])
    assert pool.stats().slabs_per_shape == {SHAPE_B: 2}
    c = pool.allocate(SHAPE_C, 6 * 42)  # C gets A's six old slabs
    assert pool.stats().slabs_per_shape == {SHAPE_B: 2, SHAPE_C: 6} and pool.stats().slabs_free == 0
    assert all(holds(pool, handle, SHAPE_B, 1) for handle in b)
    pool.free(b + c)
    stats = pool.stats()
    assert stats.slabs_in_use == 0 and stats.allocated_bytes == 0 and stats.utilisation == 0.0
    pool.validate()


def test_allocation_fills_the_fullest_slab_first(pool: HostKVPool):
    handles = pool.allocate(SHAPE_A, 3 * 32)
    by_slab: dict[int, list[int]] = {}
    for handle in handles:
        by_slab.setdefault(slab_of(pool, handle), []).append(handle)
    slabs = [by_slab[slab] for slab in sorted(by_slab)]
    pool.free(slabs[0][:5] + slabs[1][:2] + slabs[2][:9])  # slab 1 is the fullest, then 0, then 2
    first = pool.allocate(SHAPE_A, 3)
    assert sorted(first[:2]) == sorted(slabs[1][:2])  # slab 1 is filled up first ...
    assert slab_of(pool, first[2]) == slab_of(pool, slabs[0][0])  # ... then slab 0, not the emptiest
    assert pool.stats().slabs_in_use == 3


def test_utilisation_stays_high_under_a_random_workload(shm_dir: Path):
    """Requests of 1-16 blocks of three shapes come and go at random; the pool is kept under pressure.

    A request's blocks are allocated together and freed together, and the request to free is picked
    uniformly at random (memoryless lifetimes: the hard case for an allocator that cannot move blocks).
    When the pool is full, a random request is freed instead (as a scheduler would swap one back in).
    """
    slabs = 96
    pool = HostKVPool.create(shm_dir, "workload", slabs * SLAB, SLAB)
    rng = random.Random(0)
    live: list[list[int]] = []
    samples: list[float] = []
    full = reclaimed = 0
    in_use = 0
    for step in range(4000):
        if live and rng.random() < 0.3:
            pool.free(live.pop(rng.randrange(len(live))))
        else:
            try:
                live.append(pool.allocate(rng.choice((SHAPE_A, SHAPE_B, SHAPE_C)), rng.randint(1, 16)))
            except HostKVPoolFullError:
                full += 1
                pool.free(live.pop(rng.randrange(len(live))))
        stats = pool.stats()
        reclaimed += stats.slabs_in_use < in_use
        in_use = stats.slabs_in_use
        if step >= 1000 and step % 25 == 0:  # steady state: after the pool has filled once
            samples.append(stats.utilisation)
    pool.validate()
    pool.close()
    samples.sort()
    report = (
        f"utilisation over {len(samples)} checks: min {samples[0]:.3f}, 5th percentile "
        f"{samples[len(samples) // 20]:.3f}, median {samples[len(samples) // 2]:.3f}; "
        f"{full} full pool errors, {reclaimed} steps returned a slab"
    )
    print(report)
    assert full > 100  # the pool really was under pressure
    assert samples[0] > 0.90, report


def test_threads_of_one_process_share_a_pool_object(pool: HostKVPool):
    errors: list[BaseException] = []

    def churn(shape: KVShape, tag: int) -> None:
        rng = random.Random(tag)
        mine: list[int] = []
        try:
            for _ in range(300):
                if mine and rng.random() < 0.5:
                    handle = mine.pop(rng.randrange(len(mine)))
                    assert holds(pool, handle, shape, tag)
                    pool.free([handle])
                else:
                    try:
                        [handle] = pool.allocate(shape, 1)
                    except HostKVPoolFullError:
                        continue
                    fill(pool, handle, shape, tag)
                    mine.append(handle)
            assert all(holds(pool, handle, shape, tag) for handle in mine)
            pool.free(mine)
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [
        threading.Thread(target=churn, args=(shape, tag)) for tag, shape in enumerate([SHAPE_A, SHAPE_B])
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert pool.stats().slabs_in_use == 0
    pool.validate()


# --- several processes ------------------------------------------------------------------------


def _churn(pool: HostKVPool, shape: KVShape, tag: int, steps: int, between=None) -> int:
    """Allocate, write, check and free blocks at random; returns how many were found clobbered."""
    rng = random.Random(tag)
    mine: list[int] = []
    clobbered = 0
    for step in range(steps):
        if between is not None:
            between(step)
        if mine and rng.random() < 0.45:
            handle = mine.pop(rng.randrange(len(mine)))
            clobbered += not holds(pool, handle, shape, tag)
            pool.free([handle])
        else:
            try:
                mine += pool.allocate(shape, rng.randint(1, 3))
            except HostKVPoolFullError:
                continue
            for handle in mine[-3:]:
                fill(pool, handle, shape, tag)
    clobbered += sum(not holds(pool, handle, shape, tag) for handle in mine)
    pool.free(mine)
    return clobbered


def _receive(queue, child):
    """The next item the child process sends; fails at once if it died instead."""
    for _ in range(600):
        try:
            return queue.get(timeout=0.1)
        except Empty:
            if not child.is_alive():
                raise AssertionError(f"the other process died (exit code {child.exitcode})") from None
    raise AssertionError("the other process sent nothing for a minute")


def _prefill_process(directory: str, name: str, handles_out, go, results) -> None:
    """Another process: attach, allocate and write blocks, hand them over, then churn alongside."""
    pool = HostKVPool.attach(directory, name)
    handed = pool.allocate(SHAPE_A, 20) + pool.allocate(SHAPE_B, 30)
    for index, handle in enumerate(handed):
        fill(pool, handle, SHAPE_A if index < 20 else SHAPE_B, index + 1)
    handles_out.put((SHAPE_A.key, SHAPE_B.key, handed))
    go.wait()
    clobbered = _churn(pool, SHAPE_C, 77, CHURN_STEPS)
    pool.close()
    results.put(clobbered)


def test_blocks_written_in_one_process_are_read_and_freed_in_another(shm_dir: Path, pool: HostKVPool):
    context = multiprocessing.get_context("spawn")
    handles_out, results, go = context.Queue(), context.Queue(), context.Event()
    child = context.Process(target=_prefill_process, args=(str(shm_dir), "kv", handles_out, go, results))
    child.start()
    try:
        key_a, key_b, handed = _receive(handles_out, child)
        # The shape keys agree across processes (a fresh interpreter, its own hash seed).
        assert (key_a, key_b) == (SHAPE_A.key, SHAPE_B.key)
        stats = pool.stats()
        assert stats.blocks_per_shape == {SHAPE_A: 20, SHAPE_B: 30}
        assert stats.slabs_per_shape == {SHAPE_A: 1, SHAPE_B: 1}
        for index, handle in enumerate(handed):
            assert holds(pool, handle, SHAPE_A if index < 20 else SHAPE_B, index + 1), index
        go.set()
        # Both processes now allocate and free blocks of one shape at once (so they contend for the
        # same slabs), and this one frees the handed-over blocks one by one in between.
        order = random.Random(3).sample(range(len(handed)), len(handed))
        wrong: list[int] = []

        def free_one_handed(step: int) -> None:
            if step % 20 == 0 and order:
                index = order.pop()
                if not holds(pool, handed[index], SHAPE_A if index < 20 else SHAPE_B, index + 1):
                    wrong.append(index)
                pool.free([handed[index]])

        clobbered_here = _churn(pool, SHAPE_C, 55, CHURN_STEPS, between=free_one_handed)
        pool.free([handed[index] for index in order])
        clobbered_there = _receive(results, child)
        child.join(timeout=60)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
    assert not wrong, f"handed-over blocks changed before they were freed: {wrong}"
    assert (clobbered_here, clobbered_there) == (0, 0)  # no block was handed to both processes
    pool.validate()
    stats = pool.stats()
    assert stats.slabs_in_use == 0 and stats.allocated_bytes == 0


def test_a_pool_smaller_than_a_slab_is_one_slab_of_its_size(tmp_path):
    """`host_kv_pool_bytes: 1048576` alone works: the default slab (1 GiB) would not fit in it."""
    with HostKVPool.create(tmp_path, "small", 1 << 20, 1 << 30) as pool:
        stats = pool.stats()
        assert stats.capacity_bytes == 1 << 20 and stats.slabs_free == 1
