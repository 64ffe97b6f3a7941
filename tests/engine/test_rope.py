"""The rotary table: exact angles, and a cos/sin as accurate as float32 allows (see rope.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aegaeon.engine.architecture import RopeScaling
from aegaeon.engine.rope import RotaryTable, apply_rotary, inverse_frequencies

REPO_ROOT = Path(__file__).resolve().parents[2]
LLAMA3 = RopeScaling(
    theta=500000.0,
    kind="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position=64,
)
# float32 cos/sin of an exact angle are within half an ulp of the truth (<= 6e-8 for |x| <= 1) for a
# correctly rounded library and a few ulp for a vectorised one; MKL's low-accuracy kernels, which a
# startup race once picked for half of the table, were 1.5e-4 off.
TABLE_TOLERANCE = 5e-7
FRESH_PROCESSES = 3


def table_error(table: RotaryTable, head_dim: int) -> float:
    """Largest |table - float64 truth| over cos and (signed) sin."""
    positions = torch.arange(table.cos.shape[0], dtype=torch.float32)
    angles = torch.outer(positions, table.inv_freq).double()  # the float32 angles, evaluated exactly
    angles = torch.cat((angles, angles), dim=-1)
    half = head_dim // 2
    sin = angles.sin()
    signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
    return max(
        (table.cos.double() - angles.cos()).abs().max().item(),
        (table.sin.double() - signed_sin).abs().max().item(),
    )


def test_table_is_accurate():
    table = RotaryTable(LLAMA3, 16, torch.float32, torch.device("cpu"))
    assert table_error(table, 16) <= TABLE_TOLERANCE


def test_table_is_accurate_in_fresh_processes():
    """The table is usually a process's first vector-math call, where the race was."""
    code = (
        "import torch\n"
        "from aegaeon.engine.rope import RotaryTable\n"
        "from tests.engine.test_rope import LLAMA3, table_error\n"
        "print(table_error(RotaryTable(LLAMA3, 16, torch.float32, torch.device('cpu')), 16))\n"
    )
    for _ in range(FRESH_PROCESSES):
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        )
        assert float(proc.stdout) <= TABLE_TOLERANCE


def test_llama3_inverse_frequencies_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(
        hidden_size=64, num_attention_heads=4, max_position_embeddings=256,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
        rope_theta=500000.0,
    )  # fmt: skip
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    assert torch.equal(inverse_frequencies(LLAMA3, 16), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotation_equals_transformers_bit_for_bit(dtype):
    """apply_rotary (prefill, the torch paths) rounds as transformers' apply_rotary_pos_emb does; the
    CPU decode kernel rounds the same way (tests/engine/test_paged_decode.py compares them exactly)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    head_dim, heads = 16, 3
    table = RotaryTable(LLAMA3, head_dim, dtype, torch.device("cpu"))
    positions = torch.tensor([0, 1, 7, 300, 4000])
    x = torch.randn(len(positions), heads, head_dim, generator=torch.Generator().manual_seed(0)).to(dtype)
    cos, signed_sin = table.lookup(positions, int(positions.max()))
    ours = apply_rotary(x, cos, signed_sin)
    # transformers: [batch, heads, seq, dim] with cos/sin [batch, seq, dim] and the plain (unsigned) sin.
    half = head_dim // 2
    sin = torch.cat((-signed_sin[..., :half], signed_sin[..., half:]), dim=-1)
    as_hf = x.transpose(0, 1)[None]
    theirs, _ = apply_rotary_pos_emb(as_hf, as_hf, cos.transpose(0, 1), sin.transpose(0, 1))
    assert torch.equal(ours, theirs[0].transpose(0, 1))
