"""The device arena: one buffer reserved when an instance starts, carved by a bump allocator.

Everything a switch touches lives here: KV blocks at the bottom, then the weights of the resident
models above them (the active one and a prefetched next one, and more when they fit).
Allocation moves a pointer up; release moves it back to a mark. There is no free list, so there is
no fragmentation and no allocator call on the switch path, ever.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from aegaeon.config import MEMORY_ALIGNMENT, MemoryConfig


class ArenaFullError(RuntimeError):
    """The arena has fewer free bytes than an allocation needs."""


def align(nbytes: int, alignment: int = MEMORY_ALIGNMENT) -> int:
    """`nbytes` rounded up to a multiple of `alignment`."""
    return -(-nbytes // alignment) * alignment


def dtype_size(dtype: torch.dtype) -> int:
    """Bytes per element of `dtype`."""
    return torch.empty(0, dtype=dtype).element_size()


@dataclass(frozen=True)
class ArenaStats:
    capacity: int
    used: int
    high_water: int

    @property
    def free(self) -> int:
        return self.capacity - self.used


class DeviceArena:
    """A bump allocator over one preallocated byte buffer on one device."""

    def __init__(self, nbytes: int, device: torch.device | str):
        if nbytes < MEMORY_ALIGNMENT:
            raise ValueError(f"an arena needs at least {MEMORY_ALIGNMENT} bytes, got {nbytes}")
        self.device = torch.device(device)
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self.capacity = nbytes
        self._top = 0
        self._high_water = 0

    @classmethod
    def for_device(cls, device: torch.device | str, config: MemoryConfig, cpu_bytes: int) -> DeviceArena:
        """The arena of an instance: a fraction of the GPU's free memory (its share of the GPU if
        instances share it), or `cpu_bytes` on the CPU."""
        device = torch.device(device)
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            nbytes = int(free * config.device_memory_fraction)
            if config.device_sharers > 1:
                # A share of the whole GPU, not of what is free: the sharers start in any order.
                nbytes = min(nbytes, int(total * config.device_memory_fraction / config.device_sharers))
        else:
            nbytes = config.cpu_arena_bytes or cpu_bytes
        return cls(align(nbytes), device)

    @property
    def top(self) -> int:
        """The offset where the next allocation starts (also a mark to release back to)."""
        return self._top

    def stats(self) -> ArenaStats:
        return ArenaStats(self.capacity, self._top, self._high_water)

    def allocate(self, nbytes: int) -> int:
        """Reserve `nbytes` (rounded up to the alignment); returns their offset."""
        size = align(nbytes)
        if self._top + size > self.capacity:
            raise ArenaFullError(
                f"the device arena cannot hold {nbytes} more bytes: {self._top} of {self.capacity} "
                "are in use (raise cpu_arena_bytes or device_memory_fraction)"
            )
        offset = self._top
        self._top += size
        self._high_water = max(self._high_water, self._top)
        return offset

    def view(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor of `shape` and `dtype` over the arena's bytes at `offset` (no allocation)."""
        nbytes = math.prod(shape) * dtype_size(dtype)
        if offset % MEMORY_ALIGNMENT or offset < 0 or offset + nbytes > self.capacity:
            raise ValueError(f"a {nbytes}-byte view at offset {offset} is outside the arena or unaligned")
        return self.buffer[offset : offset + nbytes].view(dtype).view(shape)

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Allocate and view in one go."""
        return self.view(self.allocate(math.prod(shape) * dtype_size(dtype)), shape, dtype)

    def release(self, mark: int) -> None:
        """Free everything allocated after `mark` (a former `top`)."""
        if not 0 <= mark <= self._top:
            raise ValueError(f"cannot release to {mark}: the arena's top is {self._top}")
        self._top = mark

    def reset(self) -> None:
        """Free everything."""
        self._top = 0

    @contextmanager
    def scope(self) -> Iterator[None]:
        """Allocations made inside the block are released when it ends."""
        mark = self._top
        try:
            yield
        finally:
            self.release(mark)
