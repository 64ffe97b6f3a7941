"""The paged KV cache: a block-major tensor and the allocator of its blocks.

One block holds K and V of *all* layers for `BLOCK_SIZE` tokens and is contiguous, so moving a
request's KV (to host memory and back, or between instances) is one copy per block. The tensor is
handed to the engine, never allocated by the model: a later owner (the device arena) decides where
it lives.
"""

from __future__ import annotations

import math

import torch

from aegaeon.config import BLOCK_SIZE
from aegaeon.engine.architecture import Architecture

# Where K and V sit in a block: [layers, 2 (K and V), BLOCK_SIZE, kv_heads, head_dim].
K_INDEX, V_INDEX = 0, 1


class OutOfBlocksError(RuntimeError):
    """The KV cache has fewer free blocks than asked for."""


def kv_block_shape(arch: Architecture) -> tuple[int, ...]:
    """The shape of one block: `[layers, 2 (K and V), BLOCK_SIZE, kv_heads, head_dim]`."""
    return (arch.num_layers, 2, BLOCK_SIZE, arch.num_kv_heads, arch.head_dim)


def kv_block_bytes(arch: Architecture, dtype: torch.dtype) -> int:
    """Bytes of one KV block of this model in `dtype`."""
    return math.prod(kv_block_shape(arch)) * torch.empty(0, dtype=dtype).element_size()


class BlockAllocator:
    """First-in first-out free list over the block ids of one KV tensor (blocks freed together are
    handed out together again, so a request's blocks tend to stay consecutive)."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        # The free blocks are self._free[self._head:]: allocating moves the head, freeing appends,
        # both one slice (a swap pass allocates hundreds of blocks).
        self._free: list[int] = list(range(num_blocks))
        self._head = 0

    @property
    def num_free(self) -> int:
        return len(self._free) - self._head

    def allocate(self, count: int) -> list[int]:
        if count > self.num_free:
            raise OutOfBlocksError(f"asked for {count} KV blocks, {self.num_free} free")
        blocks = self._free[self._head : self._head + count]
        self._head += count
        if self._head > self.num_blocks:  # drop the taken prefix now and then, not on every call
            del self._free[: self._head]
            self._head = 0
        return blocks

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)
