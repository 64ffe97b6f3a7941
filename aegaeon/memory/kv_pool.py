"""The host KV pool: a slab allocator for KV blocks in one shared-memory region of a node.

KV blocks swapped out of a device, and KV handed from a prefill instance to a decode instance of the
same node, wait here. A block of a model is `[layers, 2 (K and V), 16 tokens, kv_heads, head_dim]`
contiguous elements; models differ, so blocks differ in shape and size. The pool is carved into
slabs of `kv_slab_bytes`; a slab in use holds blocks of one shape only, packed end to end from its
start. A slab whose blocks are all free is returned and can be taken by any shape. A handle is the
byte offset of its block in the region (so it is a plain int any process of the node can use).

Several processes share one pool: the node creates it (`HostKVPool.create`), instances attach to it
(`HostKVPool.attach`). So the allocator's state lives in the region too, and every access to it
holds an exclusive `fcntl.flock` on the region's file (plus a thread lock: flock does not exclude
threads sharing one open file). Nothing mutable is cached in a process.

Layout of the region (all integers int64, native byte order; offsets in bytes):

    [0, 64)                 header: MAGIC, FORMAT_VERSION, slab_bytes, num_slabs,
                            bitmap_bytes (per slab), slab_table offset, bitmaps offset, data offset
    slab table              num_slabs rows of 8 int64: shape key (0: the slab is free), layers,
                            kv_heads, head_dim, dtype code, block_bytes, blocks (in the slab),
                            used (blocks allocated)
    bitmaps                 num_slabs rows of `bitmap_bytes`: bit i (little-endian within a byte)
                            of row s is 1 while block i of slab s is allocated; the bits past the
                            slab's last block are kept at 1 while the slab is in use
    data (page-aligned)     num_slabs slabs of slab_bytes; block i of slab s starts at
                            data + s * slab_bytes + i * block_bytes (a multiple of 16)

A row of bitmap has one bit per MIN_KV_BLOCK_BYTES of slab, enough for the smallest block there is;
tmpfs gives pages only to what is written, so a slab of big blocks costs only the bits it uses.

The per-shape free lists are the bitmaps of that shape's slabs. `allocate` takes blocks from the
shape's fullest slab first, then the next fullest, and only then a free slab: new blocks fill
slabs that are almost full while the emptiest ones receive nothing, drain, and are returned. That
keeps the pool's utilisation (bytes of allocated blocks / bytes of slabs in use) high under churn.

A KV move (`copy_from_device`, `copy_to_device`) copies all of a sequence's blocks between the
device's KV region and the pool in one call: the handles are checked under one lock, and blocks
consecutive in both places go in one copy (handles are byte offsets, so a run is plain arithmetic).

A process that dies while holding the lock releases it (the kernel drops the flock), but a write it
had half done stays half done; `validate()` recounts everything and says what is inconsistent.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import itertools
import math
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from aegaeon.config import BLOCK_SIZE, MEMORY_ALIGNMENT
from aegaeon.memory.copies import Copy, CopyStream, block_runs
from aegaeon.memory.shm import SharedRegion

# The smallest block any shape can have: K and V of 16 tokens of one 1-byte element. The bitmaps
# have one bit per this many bytes of slab.
MIN_KV_BLOCK_BYTES = 2 * BLOCK_SIZE
# The data area starts on a page boundary.
DATA_ALIGNMENT = 4096
MAGIC = int.from_bytes(b"AEGKVP\x00\x01", "little")
FORMAT_VERSION = 1
# The dtypes a block may have; a dtype's code in the slab table is its index here plus one, so
# this tuple only ever grows at the end (the codes are part of the shared format).
KV_DTYPES = ("float32", "float16", "bfloat16", "float64", "int8", "uint8", "float8_e4m3fn", "float8_e5m2")

_HEADER_WORDS = 8
_SLAB_WORDS = 8
# Columns of the slab table.
_KEY, _LAYERS, _KV_HEADS, _HEAD_DIM, _DTYPE, _BLOCK_BYTES, _BLOCKS, _USED = range(_SLAB_WORDS)


class HostKVPoolFullError(RuntimeError):
    """The host KV pool cannot hold the blocks asked for (nothing was allocated)."""


def _align(nbytes: int, alignment: int) -> int:
    return -(-nbytes // alignment) * alignment


@dataclass(frozen=True)
class KVShape:
    """The shape of one model's KV block; the same on every process (its `key` is a stable hash).

    `dtype` may be given as a torch dtype or its name; it is stored as the name (e.g. "bfloat16").
    """

    layers: int
    kv_heads: int
    head_dim: int
    dtype: str

    def __post_init__(self) -> None:
        if isinstance(self.dtype, torch.dtype):
            object.__setattr__(self, "dtype", str(self.dtype).removeprefix("torch."))
        if self.dtype not in KV_DTYPES or not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"KV blocks of dtype {self.dtype!r} are not supported (supported: {KV_DTYPES})")
        for name in ("layers", "kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"a KV block needs {name} >= 1, got {getattr(self, name)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """`[layers, 2, 16, kv_heads, head_dim]`."""
        return (self.layers, 2, BLOCK_SIZE, self.kv_heads, self.head_dim)

    @property
    def block_bytes(self) -> int:
        return math.prod(self.block_shape) * self.torch_dtype.itemsize

    @property
    def key(self) -> int:
        """A positive int64, the same in every process (unlike `hash()`), never 0."""
        text = f"{self.layers}:{self.kv_heads}:{self.head_dim}:{self.dtype}".encode()
        key = int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & (2**63 - 1)
        return key or 1

    def __str__(self) -> str:
        return f"[{self.layers}, 2, {BLOCK_SIZE}, {self.kv_heads}, {self.head_dim}] {self.dtype}"


def _has_repeats(values: np.ndarray) -> bool:
    """Whether a value appears twice (a sort: numpy's hashing `unique` is slower at these sizes)."""
    return bool((np.diff(np.sort(values)) == 0).any())


@functools.cache
def _kv_shape(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> KVShape:
    """The KVShape of a device KV region's blocks (made once per shape: each move asks)."""
    return KVShape(layers, kv_heads, head_dim, dtype)


@dataclass(frozen=True)
class HostKVPoolStats:
    capacity_bytes: int  # bytes of all slabs
    slab_bytes: int
    slabs_total: int
    slabs_in_use: int
    allocated_bytes: int  # bytes of allocated blocks
    slabs_per_shape: dict[KVShape, int] = field(default_factory=dict)
    blocks_per_shape: dict[KVShape, int] = field(default_factory=dict)  # allocated blocks

    @property
    def slabs_free(self) -> int:
        return self.slabs_total - self.slabs_in_use

    @property
    def utilisation(self) -> float:
        """Bytes of allocated blocks / bytes of the slabs in use (0.0 when no slab is in use)."""
        in_use = self.slabs_in_use * self.slab_bytes
        return self.allocated_bytes / in_use if in_use else 0.0


class HostKVPool:
    """A slab allocator of KV blocks over one shared-memory region, usable from every process of a node."""

    def __init__(self, region: SharedRegion):
        self.region = region
        self.path = region.path
        self._thread_lock = threading.Lock()
        self._lock_fd = os.open(region.path, os.O_RDWR)
        try:
            self._map(region)
        except BaseException:
            os.close(self._lock_fd)
            raise

    @property
    def name(self) -> str:
        """The region's name: what another process of the node passes to `attach`."""
        return self.region.path.name

    def _map(self, region: SharedRegion) -> None:
        raw = region.tensor.numpy()
        if region.nbytes < _HEADER_WORDS * 8:
            raise ValueError(f"{region.path} is not a host KV pool (only {region.nbytes} bytes)")
        header = raw[: _HEADER_WORDS * 8].view(np.int64)
        magic, version, slab_bytes, num_slabs, bitmap_bytes, table_offset, bitmaps_offset, data_offset = (
            int(word) for word in header
        )
        if magic != MAGIC:
            raise ValueError(f"{region.path} is not a host KV pool (bad magic number)")
        if version != FORMAT_VERSION:
            raise ValueError(f"{region.path} has pool format {version}, this code reads {FORMAT_VERSION}")
        if data_offset + num_slabs * slab_bytes > region.nbytes:
            raise ValueError(f"{region.path} is shorter than its header says")
        self.slab_bytes = slab_bytes
        self.num_slabs = num_slabs
        self.capacity_bytes = num_slabs * slab_bytes
        self._data_offset = data_offset
        self._table = raw[table_offset : table_offset + num_slabs * _SLAB_WORDS * 8].view(np.int64)
        self._table = self._table.reshape(num_slabs, _SLAB_WORDS)
        self._bitmaps = raw[bitmaps_offset : bitmaps_offset + num_slabs * bitmap_bytes].reshape(
            num_slabs, bitmap_bytes
        )

    @classmethod
    def create(cls, directory: str | Path, name: str, nbytes: int, slab_bytes: int) -> HostKVPool:
        """A new, empty pool of `nbytes // slab_bytes` slabs (the node does this once).

        `nbytes` is `host_kv_pool_bytes`, `slab_bytes` is `kv_slab_bytes`; the region is a little
        larger than the slabs, for the allocator's state. A pool smaller than one slab is one slab of
        its own size, so a small pool needs no slab setting of its own.
        """
        if nbytes < MIN_KV_BLOCK_BYTES:
            raise ValueError(
                f"host_kv_pool_bytes ({nbytes}) must hold at least one KV block ({MIN_KV_BLOCK_BYTES} bytes)"
            )
        slab_bytes = min(slab_bytes, nbytes - nbytes % MEMORY_ALIGNMENT)
        if slab_bytes < MIN_KV_BLOCK_BYTES or slab_bytes % MEMORY_ALIGNMENT:
            raise ValueError(
                f"kv_slab_bytes must be a multiple of {MEMORY_ALIGNMENT} and at least {MIN_KV_BLOCK_BYTES}, "
                f"got {slab_bytes}"
            )
        num_slabs = nbytes // slab_bytes
        bitmap_bytes = _align(-(-(slab_bytes // MIN_KV_BLOCK_BYTES) // 8), 8)
        table_offset = _HEADER_WORDS * 8
        bitmaps_offset = table_offset + num_slabs * _SLAB_WORDS * 8
        data_offset = _align(bitmaps_offset + num_slabs * bitmap_bytes, DATA_ALIGNMENT)
        region = SharedRegion.create(directory, name, data_offset + num_slabs * slab_bytes)
        try:
            header = region.tensor[: _HEADER_WORDS * 8].numpy().view(np.int64)
            # The region is zeroed: every slab is free. The magic goes last: it says "ready".
            header[1:] = (
                FORMAT_VERSION,
                slab_bytes,
                num_slabs,
                bitmap_bytes,
                table_offset,
                bitmaps_offset,
                data_offset,
            )
            header[0] = MAGIC
            del header
            return cls(region)
        except BaseException:
            region.close()
            raise

    @classmethod
    def attach(cls, directory: str | Path, name: str) -> HostKVPool:
        """Map the pool that the node created (an instance does this)."""
        region = SharedRegion.attach(directory, name)
        try:
            return cls(region)
        except BaseException:
            region.close()
            raise

    # --- locking --------------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # --- allocation -----------------------------------------------------------------------------

    def _check_fits(self, shape: KVShape) -> None:
        if shape.block_bytes > self.slab_bytes:
            raise ValueError(
                f"a KV block of shape {shape} is {shape.block_bytes} bytes, larger than a slab of the host "
                f"KV pool ({self.slab_bytes} bytes): raise kv_slab_bytes to at least {shape.block_bytes}"
            )

    def _shape_slabs(self, shape: KVShape) -> np.ndarray:
        """Indices of the slabs holding `shape`; refuses a (vanishingly unlikely) key collision."""
        slabs = np.flatnonzero(self._table[:, _KEY] == shape.key)
        if len(slabs):
            row = self._table[slabs[0]]
            stored = (int(row[_LAYERS]), int(row[_KV_HEADS]), int(row[_HEAD_DIM]), int(row[_DTYPE]))
            if stored != (shape.layers, shape.kv_heads, shape.head_dim, KV_DTYPES.index(shape.dtype) + 1):
                raise RuntimeError(f"shape {shape} has the key of another shape in the host KV pool")
        return slabs

    def allocate(self, shape: KVShape, count: int) -> list[int]:
        """`count` blocks of `shape`; all of them or none (HostKVPoolFullError)."""
        if count < 0:
            raise ValueError(f"cannot allocate {count} blocks")
        self._check_fits(shape)
        with self._locked():
            handles = self._allocate(shape, count)
            if handles is None:
                raise HostKVPoolFullError(self._full_message(shape, count))
            return handles

    def allocate_each(self, shape: KVShape, counts: Sequence[int]) -> list[list[int] | None]:
        """`counts[i]` blocks of `shape` for each i, under one lock: as `allocate` once per count in
        order, but None (instead of HostKVPoolFullError) for a count the pool cannot hold after those
        before it."""
        if any(count < 0 for count in counts):
            raise ValueError(f"cannot allocate {min(counts)} blocks")
        self._check_fits(shape)
        with self._locked():
            total = sum(counts)
            together = self._allocate(shape, total)
            if together is not None:  # the usual case: all fit, taken in one pass over the slabs
                bounds = list(itertools.accumulate(counts, initial=0))
                return [together[start:end] for start, end in itertools.pairwise(bounds)]
            return [self._allocate(shape, count) for count in counts]

    def _allocate(self, shape: KVShape, count: int) -> list[int] | None:
        """`count` blocks of `shape` (fullest slab first), or None if they do not fit. The lock is held."""
        if count == 0:
            return []
        blocks_per_slab = self.slab_bytes // shape.block_bytes
        table = self._table
        slabs = self._shape_slabs(shape)
        free_slabs = np.flatnonzero(table[:, _KEY] == 0)
        free_in_shape = int((table[slabs, _BLOCKS] - table[slabs, _USED]).sum())
        if count > free_in_shape + len(free_slabs) * blocks_per_slab:
            return None
        # Fullest slab first (ties: lowest index), then free slabs in order.
        partial = slabs[table[slabs, _USED] < table[slabs, _BLOCKS]]
        order = partial[np.argsort(-table[partial, _USED], kind="stable")]
        handles: list[int] = []
        for slab in [*order.tolist(), *free_slabs.tolist()]:
            if len(handles) == count:
                break
            if table[slab, _KEY] == 0:
                self._assign(slab, shape, blocks_per_slab)
            handles += self._take(slab, count - len(handles), shape.block_bytes)
        return handles

    def _assign(self, slab: int, shape: KVShape, blocks: int) -> None:
        self._table[slab] = (
            shape.key,
            shape.layers,
            shape.kv_heads,
            shape.head_dim,
            KV_DTYPES.index(shape.dtype) + 1,
            shape.block_bytes,
            blocks,
            0,
        )
        bitmap = self._bitmaps[slab]
        full_bytes, tail_bits = divmod(blocks, 8)
        if tail_bits:  # the bits past the last block count as allocated, so they are never handed out
            bitmap[full_bytes] = (0xFF << tail_bits) & 0xFF

    def _take(self, slab: int, want: int, block_bytes: int) -> list[int]:
        """Up to `want` free blocks of `slab`, lowest first, marked allocated; their handles."""
        row = self._table[slab]
        bitmap = self._bitmaps[slab, : -(-int(row[_BLOCKS]) // 8)]
        want = min(want, int(row[_BLOCKS] - row[_USED]))
        candidates = np.flatnonzero(bitmap != 0xFF)[:want]  # each byte has at least one free block
        bits = np.unpackbits(bitmap[candidates], bitorder="little").reshape(-1, 8)
        blocks = (candidates[:, None] * 8 + np.arange(8))[bits == 0][:want]
        np.bitwise_or.at(bitmap, blocks >> 3, (1 << (blocks & 7)).astype(np.uint8))
        row[_USED] += len(blocks)
        base = self._data_offset + slab * self.slab_bytes
        return (base + blocks * block_bytes).tolist()

    def _full_message(self, shape: KVShape, count: int) -> str:
        """Why `count` blocks of `shape` do not fit. The lock is held."""
        blocks_per_slab = self.slab_bytes // shape.block_bytes
        slabs = self._shape_slabs(shape)
        free_in_shape = int((self._table[slabs, _BLOCKS] - self._table[slabs, _USED]).sum())
        free_slabs = int((self._table[:, _KEY] == 0).sum())
        return (
            f"the host KV pool {self.path} cannot hold {count} blocks of shape {shape} "
            f"({count * shape.block_bytes} bytes): that shape's {len(slabs)} slabs have {free_in_shape} free "
            f"blocks and {free_slabs} of {self.num_slabs} slabs of {self.slab_bytes} bytes are free "
            f"({blocks_per_slab} blocks each), so {free_in_shape + free_slabs * blocks_per_slab} fit; "
            f"free some blocks or raise host_kv_pool_bytes (now {self.capacity_bytes} bytes of slabs)"
        )

    # --- handles --------------------------------------------------------------------------------

    def _locate(self, handle: int) -> tuple[int, int]:
        """(slab, block index) of an allocated block; ValueError for anything else."""
        offset = int(handle) - self._data_offset
        if not 0 <= offset < self.capacity_bytes:
            raise ValueError(f"{handle} is not a block handle of the host KV pool {self.path}")
        slab, within = divmod(offset, self.slab_bytes)
        row = self._table[slab]
        if row[_KEY] == 0:
            raise ValueError(f"block {handle} of the host KV pool is not allocated (its slab is free)")
        block, misalign = divmod(within, int(row[_BLOCK_BYTES]))
        if misalign or block >= row[_BLOCKS]:
            raise ValueError(f"{handle} is not the start of a block in the host KV pool {self.path}")
        if not (self._bitmaps[slab, block >> 3] >> (block & 7)) & 1:
            raise ValueError(f"block {handle} of the host KV pool is not allocated (freed twice?)")
        return slab, block

    def free(self, handles: Iterable[int]) -> None:
        """Return blocks to the pool; a slab left without blocks becomes free for any shape.

        All handles are checked first: a foreign, repeated or already freed one raises ValueError and
        frees nothing.
        """
        handles = np.fromiter(handles, dtype=np.int64)
        if _has_repeats(handles):
            raise ValueError("the same block handle appears twice in one free()")
        with self._locked():
            slabs, blocks = self._locate_all(handles)
            np.bitwise_and.at(self._bitmaps, (slabs, blocks >> 3), ~(1 << (blocks & 7)).astype(np.uint8))
            touched, counts = np.unique(slabs, return_counts=True)
            self._table[touched, _USED] -= counts
            for slab in touched[self._table[touched, _USED] == 0].tolist():  # empty: give it back
                self._bitmaps[slab, : -(-int(self._table[slab, _BLOCKS]) // 8)] = 0
                self._table[slab] = 0

    def _locate_all(self, handles: np.ndarray, shape: KVShape | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(slabs, block indices) of allocated blocks (of `shape`, if given); ValueError naming the
        first handle that is anything else. The lock is held."""
        offsets = handles - self._data_offset
        inside = (offsets >= 0) & (offsets < self.capacity_bytes)
        slabs, within = np.divmod(np.where(inside, offsets, 0), self.slab_bytes)
        rows = self._table[slabs]
        block_bytes = np.maximum(rows[:, _BLOCK_BYTES], 1)  # a free slab's row is all zero
        blocks, misalign = np.divmod(within, block_bytes)
        good = inside & (rows[:, _KEY] != 0) & (misalign == 0) & (blocks < rows[:, _BLOCKS])
        blocks = np.where(good, blocks, 0)
        good &= ((self._bitmaps[slabs, blocks >> 3] >> (blocks & 7)) & 1) == 1
        if shape is not None:
            good &= rows[:, _KEY] == shape.key
        if not good.all():
            bad = int(handles[np.argmin(good)])
            self._locate(bad)  # raises for anything but an allocated block of another shape
            raise ValueError(f"block {bad} of the host KV pool does not have shape {shape}")
        return slabs, blocks

    def _move_plan(
        self, handles: list[int], kv: torch.Tensor, blocks: list[int], part: int = 0, parts: int = 1
    ) -> tuple[torch.Tensor, np.ndarray]:
        """The device KV region's bytes and the runs pairing its `blocks` with the pool's `handles`
        (rows of pool offset, device offset, bytes).

        A tensor-parallel engine's host block holds every rank's block, rank r's at part r: the
        pool block has `parts` times the device block's layers, and this rank's are the `part`-th run.
        """
        if kv.dim() != 6 or kv.shape[2:4] != (2, BLOCK_SIZE) or not kv.is_contiguous():
            raise ValueError(
                f"a KV region is a contiguous [blocks, layers, 2, {BLOCK_SIZE}, kv_heads, head_dim] "
                f"tensor, got {tuple(kv.shape)}"
            )
        shape = _kv_shape(kv.shape[1] * parts, kv.shape[4], kv.shape[5], kv.dtype)
        if not 0 <= part < parts:
            raise ValueError(f"part {part} of a host KV block in {parts} parts does not exist")
        if len(handles) != len(blocks):
            raise ValueError(f"{len(handles)} host KV blocks for {len(blocks)} device blocks")
        host = np.array(handles, dtype=np.int64)
        device = np.array(blocks, dtype=np.int64)
        if _has_repeats(host) or _has_repeats(device):
            raise ValueError("a KV move names the same block twice")
        if len(device) and not (0 <= device.min() and device.max() < kv.shape[0]):
            raise ValueError(f"device KV blocks {blocks} are not all below {kv.shape[0]}")
        with self._locked():
            self._locate_all(host, shape)
        block_bytes = shape.block_bytes // parts
        runs = block_runs(host + part * block_bytes, device * block_bytes, block_bytes)
        return kv.view(-1).view(torch.uint8), runs

    def copy_from_device(
        self,
        copies: CopyStream,
        handles: list[int],
        kv: torch.Tensor,
        blocks: list[int],
        part: int = 0,
        parts: int = 1,
    ) -> Copy:
        """Start copying device KV blocks `kv[blocks[i]]` into pool blocks `handles[i]`.

        `kv` is the device's KV region, `[blocks, layers, 2, 16, kv_heads, head_dim]`; the handles
        must be allocated blocks of its shape. One copy per run of blocks consecutive on both sides;
        the pool's lock is taken once, to check the handles.
        """
        device, runs = self._move_plan(handles, kv, blocks, part, parts)
        return copies.copy_runs(self.region.tensor, device, runs)

    def copy_to_device(
        self,
        copies: CopyStream,
        handles: list[int],
        kv: torch.Tensor,
        blocks: list[int],
        part: int = 0,
        parts: int = 1,
    ) -> Copy:
        """Start copying pool blocks `handles[i]` into device KV blocks `kv[blocks[i]]` (see above)."""
        device, runs = self._move_plan(handles, kv, blocks, part, parts)
        return copies.copy_runs(device, self.region.tensor, runs[:, [1, 0, 2]])

    def view(self, handle: int, shape: KVShape) -> torch.Tensor:
        """The block as a `[layers, 2, 16, kv_heads, head_dim]` tensor of its dtype (a view, no copy)."""
        with self._locked():
            slab, _ = self._locate(handle)
            if self._table[slab, _KEY] != shape.key:
                raise ValueError(f"block {handle} of the host KV pool does not have shape {shape}")
        handle = int(handle)
        block = self.region.tensor[handle : handle + shape.block_bytes]
        return block.view(shape.torch_dtype).view(shape.block_shape)

    # --- inspection -----------------------------------------------------------------------------

    def stats(self) -> HostKVPoolStats:
        with self._locked():
            rows = self._table[self._table[:, _KEY] != 0].copy()
        slabs: dict[KVShape, int] = {}
        blocks: dict[KVShape, int] = {}
        for row in rows.tolist():
            shape = KVShape(row[_LAYERS], row[_KV_HEADS], row[_HEAD_DIM], KV_DTYPES[row[_DTYPE] - 1])
            slabs[shape] = slabs.get(shape, 0) + 1
            blocks[shape] = blocks.get(shape, 0) + row[_USED]
        return HostKVPoolStats(
            capacity_bytes=self.capacity_bytes,
            slab_bytes=self.slab_bytes,
            slabs_total=self.num_slabs,
            slabs_in_use=len(rows),
            allocated_bytes=int((rows[:, _USED] * rows[:, _BLOCK_BYTES]).sum()),
            slabs_per_shape=slabs,
            blocks_per_shape=blocks,
        )

    def validate(self) -> None:
        """Recount the shared state; RuntimeError naming the first inconsistency (a debugging aid)."""
        with self._locked():
            for slab in range(self.num_slabs):
                row = self._table[slab].tolist()
                bitmap = self._bitmaps[slab]
                if row[_KEY] == 0:
                    if any(row) or bitmap.any():
                        raise RuntimeError(f"free slab {slab} of {self.path} has state left: {row}")
                    continue
                blocks = row[_BLOCKS]
                bits = np.unpackbits(bitmap, bitorder="little")
                padded = -(-blocks // 8) * 8  # the tail bits of the last byte stay set
                if not bits[blocks:padded].all() or bits[padded:].any():
                    raise RuntimeError(f"slab {slab} of {self.path} has wrong bits past its {blocks} blocks")
                used = int(bits[:blocks].sum())
                if used != row[_USED] or used == 0:
                    raise RuntimeError(f"slab {slab} of {self.path} counts {row[_USED]} blocks, has {used}")
                if blocks != self.slab_bytes // row[_BLOCK_BYTES]:
                    raise RuntimeError(f"slab {slab} of {self.path} has a wrong block count: {row}")

    def pin(self, device: torch.device | str | None = None) -> None:
        """Page-lock the region for asynchronous copies to and from devices (see SharedRegion.pin)."""
        self.region.pin(device)

    def close(self) -> None:
        """Unmap the pool; the owner (the creator) also removes its file. Views of blocks must be gone."""
        if self._lock_fd < 0:
            return
        del self._table, self._bitmaps
        os.close(self._lock_fd)
        self._lock_fd = -1
        self.region.close()

    def __enter__(self) -> HostKVPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
