"""CPU decode planning: groups of rows that waste little padding, and the masks over their keys."""

from __future__ import annotations

import random

import torch

from aegaeon.engine.attention import MAX_DECODE_GROUPS, decode_mask, plan_groups
from aegaeon.engine.kv_cache import BLOCK_SIZE

SEED = 0


def test_decode_groups_cover_rows_in_any_order() -> None:
    rng = random.Random(SEED)
    for _ in range(50):
        sizes = [rng.randint(1, 400) for _ in range(rng.randint(1, 20))]
        groups = plan_groups(sizes, group_cost=50)
        assert len(groups) <= MAX_DECODE_GROUPS
        assert [g[0] for g in groups] == [0] + [g[1] for g in groups[:-1]] and groups[-1][1] == len(sizes)
    # Unsorted rows still split where the padding is: short rows at both ends of a long run.
    assert plan_groups([10, 10, 300, 300, 10, 10], group_cost=1) == [(0, 2), (2, 4), (4, 6)]


def test_decode_mask() -> None:
    lengths = [5, 9, 16, 3, 17]
    max_blocks = 2
    keys = torch.arange(max_blocks * BLOCK_SIZE)
    mask = decode_mask(torch.tensor(lengths), max_blocks, sliding_window=None)
    assert mask.shape == (len(lengths), 1, 1, max_blocks * BLOCK_SIZE)
    for row, length in enumerate(lengths):
        assert torch.equal(mask[row, 0, 0], keys < length)
    windowed = decode_mask(torch.tensor(lengths), max_blocks, sliding_window=4)
    for row, length in enumerate(lengths):
        # The query sits at position length - 1 and sees the last 4 positions, itself included.
        assert torch.equal(windowed[row, 0, 0], (keys < length) & (keys > length - 1 - 4))
