"""Paged decode attention semantics shared by the kernels: input checks and a pure-torch reference.

Each decode row has one query token and a block table into the block-major KV cache
`[num_blocks, num_layers, 2 (K/V), BLOCK_SIZE, num_kv_heads, head_dim]`; it sees the first
`context_lens[row]` tokens of its table (the last `sliding_window` of them when a window applies).
A kernel handed `rotary` (the rows' cos and signed sin from `RotaryTable.lookup`, `[rows, 1, head_dim]`)
first rotates the query and the new key, as `rotate_decode_inputs` does; handed `new_kv`
(`[rows, 2, kv_heads, head_dim]`, this step's K and V) it then stores each row's at its newest
position, `context_lens[row] - 1`, as `store_new_kv` does.
"""

from __future__ import annotations

import torch

from aegaeon.engine.kv_cache import BLOCK_SIZE, K_INDEX, V_INDEX
from aegaeon.engine.rope import apply_rotary

KV_CACHE_NDIM = 6
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_paged_decode_inputs(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    sliding_window: int | None,
    new_kv: torch.Tensor | None = None,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Raise ValueError unless the arguments describe a valid paged decode step."""
    if q.dim() != 3:
        raise ValueError(f"q must be [batch, num_q_heads, head_dim], got shape {tuple(q.shape)}")
    if kv_cache.dim() != KV_CACHE_NDIM or kv_cache.shape[2] != 2 or kv_cache.shape[3] != BLOCK_SIZE:
        raise ValueError(
            f"kv_cache must be [num_blocks, num_layers, 2, {BLOCK_SIZE}, num_kv_heads, head_dim], "
            f"got shape {tuple(kv_cache.shape)}"
        )
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[4]
    if kv_cache.shape[5] != head_dim:
        raise ValueError(f"head_dim mismatch: q has {head_dim}, kv_cache has {kv_cache.shape[5]}")
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if q.dtype != kv_cache.dtype or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"q and kv_cache must share a dtype in {SUPPORTED_DTYPES}, got {q.dtype} and {kv_cache.dtype}"
        )
    if not 0 <= layer < kv_cache.shape[1]:
        raise ValueError(f"layer {layer} out of range for {kv_cache.shape[1]} layers")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or block_tables.dtype != torch.int32:
        raise ValueError(
            f"block_tables must be int32 [{batch}, max_blocks], "
            f"got {block_tables.dtype} {tuple(block_tables.shape)}"
        )
    if context_lens.shape != (batch,) or context_lens.dtype != torch.int32:
        raise ValueError(
            f"context_lens must be int32 [{batch}], got {context_lens.dtype} {tuple(context_lens.shape)}"
        )
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be positive or None, got {sliding_window}")
    if new_kv is not None and (new_kv.shape != (batch, 2, num_kv_heads, head_dim) or new_kv.dtype != q.dtype):
        raise ValueError(
            f"new_kv must be {q.dtype} [{batch}, 2, {num_kv_heads}, {head_dim}], "
            f"got {new_kv.dtype} {tuple(new_kv.shape)}"
        )
    if rotary is not None and any(t.shape != (batch, 1, head_dim) or t.dtype != q.dtype for t in rotary):
        raise ValueError(
            f"rotary must be (cos, sin), each {q.dtype} [{batch}, 1, {head_dim}], "
            f"got {[(t.dtype, tuple(t.shape)) for t in rotary]}"
        )


def rotate_decode_inputs(
    q: torch.Tensor, new_kv: torch.Tensor | None, rotary: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q and new_kv with the query and the new key rotated by `rotary` (new tensors)."""
    cos, sin = rotary
    q = apply_rotary(q, cos, sin)
    if new_kv is not None:
        new_kv = new_kv.clone()
        new_kv[:, 0] = apply_rotary(new_kv[:, 0], cos, sin)
    return q, new_kv


def store_new_kv(
    kv_cache: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    new_kv: torch.Tensor,
) -> None:
    """Write each row's `new_kv` into its slot at position `context_lens[row] - 1` (a row with a new
    token has a context of at least 1; not checked here, which would synchronise a CUDA stream)."""
    positions = context_lens.long() - 1
    rows = torch.arange(len(positions), device=positions.device)
    blocks = block_tables[rows, positions // BLOCK_SIZE].long()
    kv_cache[blocks, layer, :, positions % BLOCK_SIZE] = new_kv


def paged_decode_attention_reference(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    new_kv: torch.Tensor | None = None,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Pure-torch paged decode attention: gather each row's blocks, mask, softmax in float32."""
    check_paged_decode_inputs(q, kv_cache, layer, block_tables, context_lens, sliding_window, new_kv, rotary)
    if rotary is not None:
        q, new_kv = rotate_decode_inputs(q, new_kv, rotary)
    if new_kv is not None:
        store_new_kv(kv_cache, layer, block_tables, context_lens, new_kv)
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[4]
    group = num_q_heads // num_kv_heads
    out = torch.zeros_like(q)
    for b in range(batch):
        ctx = int(context_lens[b])
        if ctx == 0:  # padded batch rows attend to nothing; zeros rather than 0/0 NaN
            continue
        num_blocks = (ctx + BLOCK_SIZE - 1) // BLOCK_SIZE
        blocks = block_tables[b, :num_blocks].long()
        # [num_blocks, 2, BLOCK_SIZE, kvh, d] -> [2, tokens, kvh, d], cut to the context
        kv = kv_cache[blocks, layer].transpose(0, 1)
        kv = kv.reshape(2, num_blocks * BLOCK_SIZE, num_kv_heads, head_dim)
        k = kv[K_INDEX, :ctx].float().repeat_interleave(group, dim=1)  # [ctx, num_q_heads, d]
        v = kv[V_INDEX, :ctx].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,thd->ht", q[b].float(), k) * scale
        if sliding_window is not None:
            positions = torch.arange(ctx, device=q.device)
            scores = scores.masked_fill((ctx - 1) - positions >= sliding_window, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[b] = torch.einsum("ht,thd->hd", probs, v).to(q.dtype)
    return out
