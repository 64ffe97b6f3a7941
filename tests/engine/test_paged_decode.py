"""The paged decode semantics every kernel must follow: the pure-torch reference against plain
attention, its input checks, and the helpers the kernel tests (CPU and Triton) share."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable

import pytest
import torch

from aegaeon.engine.kv_cache import BLOCK_SIZE
from aegaeon.engine.paged_decode import paged_decode_attention_reference

CONTEXT_LENS = (1, 15, 16, 17, 100, 0)  # 0 = a padded batch row, which must come back as zeros
NUM_LAYERS = 3
LAYER = 2  # > 0 so a wrong layer stride cannot pass by accident
NUM_KV_HEADS = 2
SLIDING_WINDOW = 20  # cuts the 100-token row mid-block and leaves the short rows whole
GROUP_SIZES = (1, 4, 16)  # Triton: 16 takes the tl.dot path; smaller groups the broadcast-reduce path
HEAD_DIMS = (24, 64)  # 24 exercises a head dimension that is not a power of two
WINDOWS = (None, SLIDING_WINDOW)
# Kernels and reference accumulate in float32; the gap is the final rounding to the output dtype
# (about one ulp at |out| < 4) plus, for Triton's tl.dot path, the rounding of softmax probabilities
# to the input dtype before P @ V, as FlashAttention does.
TOLERANCES = {
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}
DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SEED = 0


def make_case(
    group: int, head_dim: int, dtype: torch.dtype, device: str, seed: int = SEED
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q, block-major cache, shuffled block tables and context lengths for one batch."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(CONTEXT_LENS)
    max_blocks = -(-max(CONTEXT_LENS) // BLOCK_SIZE)
    num_blocks = batch * max_blocks + 3  # spare blocks that no row owns
    kv_cache = torch.randn(num_blocks, NUM_LAYERS, 2, BLOCK_SIZE, NUM_KV_HEADS, head_dim, generator=gen)
    # Shuffled, disjoint physical blocks so logical order never matches physical order.
    block_tables = torch.randperm(num_blocks, generator=gen)[: batch * max_blocks].reshape(batch, max_blocks)
    num_q_heads = NUM_KV_HEADS * group
    # q as a strided view into a fused qkv-like buffer, as the model produces it.
    fused = torch.randn(batch, num_q_heads * head_dim + 2 * NUM_KV_HEADS * head_dim, generator=gen)
    q = fused[:, : num_q_heads * head_dim].view(batch, num_q_heads, head_dim)
    context_lens = torch.tensor(CONTEXT_LENS, dtype=torch.int32)
    return (
        q.to(device=device, dtype=dtype),
        kv_cache.to(device=device, dtype=dtype),
        block_tables.to(device=device, dtype=torch.int32),
        context_lens.to(device),
    )


def check_kernel_against_reference(
    kernel: Callable, dtype: torch.dtype, device: str, head_dims: tuple[int, ...] = HEAD_DIMS
) -> list[str]:
    """Run every case through kernel and reference, also with this step's K/V to store first (rows
    with a context), and with q and the new K to rotate before that; return each mismatch."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    failures = []
    for group, head_dim, window in itertools.product(GROUP_SIZES, head_dims, WINDOWS):
        # The interpreter's tl.dot multiplies bfloat16's raw uint16 storage with numpy (triton 3.9
        # InterpreterBuilder.create_dot), so the dot path cannot be checked in bf16 on CPU.
        if interpreted and dtype == torch.bfloat16 and group >= 16:
            continue
        case = f"group={group} head_dim={head_dim} window={window}"
        q, kv_cache, block_tables, context_lens = make_case(group, head_dim, dtype, device)
        scale = head_dim**-0.5
        out = kernel(q, kv_cache, LAYER, block_tables, context_lens, scale, window)
        ref = paged_decode_attention_reference(q, kv_cache, LAYER, block_tables, context_lens, scale, window)
        failures += _mismatches(case, out, ref, q)
        rows = context_lens > 0
        q, block_tables, context_lens = q[rows], block_tables[rows], context_lens[rows]
        new_kv = torch.randn(len(q), 2, NUM_KV_HEADS, head_dim, generator=torch.Generator().manual_seed(SEED))
        new_kv = new_kv.to(device=device, dtype=dtype)
        kernel_cache, reference_cache = kv_cache.clone(), kv_cache.clone()
        out = kernel(q, kernel_cache, LAYER, block_tables, context_lens, scale, window, new_kv=new_kv)
        ref = paged_decode_attention_reference(
            q, reference_cache, LAYER, block_tables, context_lens, scale, window, new_kv=new_kv
        )
        failures += _mismatches(f"{case} storing new K/V", out, ref, q)
        if not torch.equal(kernel_cache, reference_cache):
            failures.append(f"{case}: the new K/V landed elsewhere than the reference put them")
        rotary = rotary_rows(len(q), head_dim, dtype, device)
        kernel_cache, reference_cache = kv_cache.clone(), kv_cache.clone()
        out = kernel(
            q, kernel_cache, LAYER, block_tables, context_lens, scale, window, new_kv=new_kv, rotary=rotary
        )
        ref = paged_decode_attention_reference(
            q, reference_cache, LAYER, block_tables, context_lens, scale, window, new_kv=new_kv, rotary=rotary
        )
        failures += _mismatches(f"{case} rotating and storing new K/V", out, ref, q)
        if not torch.equal(kernel_cache, reference_cache):
            failures.append(f"{case}: the rotated new K differs from the reference's, or landed elsewhere")
    return failures


def rotary_rows(
    rows: int, head_dim: int, dtype: torch.dtype, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin rows `[rows, 1, head_dim]` for random angles, in RotaryTable's convention."""
    angles = torch.rand(rows, 1, head_dim // 2, generator=torch.Generator().manual_seed(SEED)) * 100
    cos = torch.cat((angles.cos(), angles.cos()), dim=-1)
    sin = torch.cat((-angles.sin(), angles.sin()), dim=-1)
    return cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype)


def _mismatches(case: str, out: torch.Tensor, ref: torch.Tensor, q: torch.Tensor) -> list[str]:
    tol = TOLERANCES[q.dtype]
    if out.dtype != q.dtype or out.shape != q.shape:
        return [f"{case}: got {out.dtype} {out.shape}"]
    if not torch.allclose(out.float(), ref.float(), atol=tol, rtol=tol):
        return [f"{case}: max abs err {(out.float() - ref.float()).abs().max().item():.3g}"]
    return []


def _naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q·Kᵀ)V for one row in float64; q [heads, d], k/v [tokens, heads, d]."""
    scores = torch.einsum("hd,thd->ht", q.double(), k.double()) * scale
    return torch.einsum("ht,thd->hd", torch.softmax(scores, dim=-1), v.double())


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("window", WINDOWS)
def test_reference_matches_unpaged_attention(group: int, window: int | None) -> None:
    """The reference equals plain attention over contiguous K/V that were scattered into pages."""
    gen = torch.Generator().manual_seed(SEED)
    head_dim = 24
    batch = len(CONTEXT_LENS)
    max_blocks = -(-max(CONTEXT_LENS) // BLOCK_SIZE)
    num_q_heads = NUM_KV_HEADS * group
    # Contiguous, unpaged K/V per row: [batch, max_tokens, kv_heads, head_dim].
    k = torch.randn(batch, max_blocks * BLOCK_SIZE, NUM_KV_HEADS, head_dim, generator=gen)
    v = torch.randn(batch, max_blocks * BLOCK_SIZE, NUM_KV_HEADS, head_dim, generator=gen)
    q = torch.randn(batch, num_q_heads, head_dim, generator=gen)
    num_blocks = batch * max_blocks
    block_tables = torch.randperm(num_blocks, generator=gen).reshape(batch, max_blocks).to(torch.int32)
    kv_cache = torch.randn(num_blocks, NUM_LAYERS, 2, BLOCK_SIZE, NUM_KV_HEADS, head_dim, generator=gen)
    for b, t in itertools.product(range(batch), range(max_blocks * BLOCK_SIZE)):
        block, slot = block_tables[b, t // BLOCK_SIZE], t % BLOCK_SIZE
        kv_cache[block, LAYER, 0, slot] = k[b, t]
        kv_cache[block, LAYER, 1, slot] = v[b, t]
    context_lens = torch.tensor(CONTEXT_LENS, dtype=torch.int32)
    scale = head_dim**-0.5

    out = paged_decode_attention_reference(q, kv_cache, LAYER, block_tables, context_lens, scale, window)

    for b, ctx in enumerate(CONTEXT_LENS):
        if ctx == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b]))
            continue
        start = 0 if window is None else max(ctx - window, 0)
        # Query head h reads kv head h // group.
        k_row = k[b, start:ctx].repeat_interleave(group, dim=1)
        v_row = v[b, start:ctx].repeat_interleave(group, dim=1)
        expected = _naive_attention(q[b], k_row, v_row, scale)
        torch.testing.assert_close(out[b].double(), expected, atol=1e-5, rtol=1e-5)


def test_reference_rejects_bad_inputs() -> None:
    """Shape and dtype errors surface as ValueError, not as wrong results."""
    q, kv_cache, block_tables, context_lens = make_case(1, 24, torch.float32, "cpu")
    scale = 24**-0.5
    with pytest.raises(ValueError, match="block_tables"):
        paged_decode_attention_reference(q, kv_cache, LAYER, block_tables.long(), context_lens, scale)
    with pytest.raises(ValueError, match="layer"):
        paged_decode_attention_reference(q, kv_cache, NUM_LAYERS, block_tables, context_lens, scale)
    with pytest.raises(ValueError, match="multiple"):
        paged_decode_attention_reference(
            q[:, :1].expand(-1, 3, -1), kv_cache, LAYER, block_tables, context_lens, scale
        )
    with pytest.raises(ValueError, match="sliding_window"):
        paged_decode_attention_reference(q, kv_cache, LAYER, block_tables, context_lens, scale, 0)
