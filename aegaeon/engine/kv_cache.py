"""The paged KV cache: a block-major tensor and the allocator of its blocks.

One block holds K and V of *all* layers for `BLOCK_SIZE` tokens and is contiguous, so moving a
request's KV (to host memory and back, or between instances) is one copy per block. The tensor is
handed to the engine, never allocated by the model: a later owner (the device arena) decides where
it lives.
"""

from __future__ import annotations

import math
from collections import deque

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
    """Free list over the block ids of one KV tensor."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfBlocksError(f"asked for {count} KV blocks, {len(self._free)} free")
        return [self._free.popleft() for _ in range(count)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)
