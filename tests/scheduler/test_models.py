from __future__ import annotations

import pytest

from aegaeon.scheduler.models import ModelSpec, blocks_for_tokens


def test_blocks_round_up_to_whole_blocks() -> None:
    assert [blocks_for_tokens(n) for n in (0, 1, 16, 17, 32, 33)] == [0, 1, 1, 2, 2, 3]


def test_kv_bytes_is_blocks_times_block_bytes() -> None:
    spec = ModelSpec("m", "shape", 1 << 20, kv_block_bytes=4096, max_model_len=2048)
    assert spec.kv_bytes(17) == 2 * 4096
    assert spec.kv_bytes(0) == 0


def test_spec_refuses_nonpositive_sizes() -> None:
    with pytest.raises(ValueError, match="kv_block_bytes"):
        ModelSpec("m", "shape", 1, kv_block_bytes=0, max_model_len=16)
