"""The scheduler's torch-free description of a served model."""

from __future__ import annotations

import math
from dataclasses import dataclass

from aegaeon.config import BLOCK_SIZE


def blocks_for_tokens(tokens: int) -> int:
    """KV blocks that hold `tokens` tokens."""
    return math.ceil(max(tokens, 0) / BLOCK_SIZE)


@dataclass(frozen=True)
class ModelSpec:
    """What the scheduler knows of a model: its name, shape and memory footprint."""

    name: str
    # The architecture's shape key (engine `Architecture.shape_key`): profiles are keyed by it.
    shape_key: str
    weight_bytes: int
    # Bytes of one KV block: K and V of all layers for BLOCK_SIZE tokens.
    kv_block_bytes: int
    # Longest sequence (prompt + output) the model serves.
    max_model_len: int

    def __post_init__(self) -> None:
        for name in ("weight_bytes", "kv_block_bytes", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def kv_bytes(self, tokens: int) -> int:
        """Bytes of the KV blocks that hold `tokens` tokens of one sequence."""
        return blocks_for_tokens(tokens) * self.kv_block_bytes
