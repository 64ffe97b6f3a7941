"""Paged decode attention for CUDA as a Triton kernel (semantics and reference: paged_decode.py)."""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs run the torch path and never call the kernel
    triton = None
    tl = None

from aegaeon.engine.kv_cache import BLOCK_SIZE, K_INDEX, V_INDEX
from aegaeon.engine.paged_decode import check_paged_decode_inputs, rotate_decode_inputs, store_new_kv

# From this many (padded) query heads per KV head on, tl.dot (tensor cores) beats a broadcast
# multiply-reduce, whose [group, block, head_dim] fp32 temporary would spill registers.
_DOT_MIN_GROUP = 16
_DEFAULT_DOT_PRECISION = "tf32"  # triton's CUDA default; only affects float32 operands
_LOG2E = 1.4426950408889634  # the kernel uses exp2, so the softmax scale is folded into base 2


if triton is not None:

    @triton.jit
    def _paged_decode_kernel(
        out_ptr, q_ptr, k_ptr, v_ptr, block_tables_ptr, context_lens_ptr,
        qk_scale_log2, window,
        stride_qb, stride_qh, stride_qd,
        stride_ob, stride_oh, stride_od,
        stride_kvb, stride_kvs, stride_kvh, stride_kvd,
        stride_btb, stride_btn,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
        BLOCK: tl.constexpr, HAS_WINDOW: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """One program per (batch row, kv head): all query heads of the GQA group share each K/V load."""
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        ctx = tl.load(context_lens_ptr + row)
        start = 0
        if HAS_WINDOW:
            start = tl.maximum(ctx - window, 0)

        heads = tl.arange(0, GROUP_PAD)
        dims = tl.arange(0, HEAD_PAD)
        slots = tl.arange(0, BLOCK)
        head_mask = heads < GROUP
        dim_mask = dims < HEAD_DIM

        q_heads = kv_head * GROUP + heads
        q_offs = row * stride_qb + q_heads[:, None] * stride_qh + dims[None, :] * stride_qd
        q = tl.load(q_ptr + q_offs, mask=head_mask[:, None] & dim_mask[None, :], other=0.0)

        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_PAD], tl.float32)

        # Only blocks holding at least one visible token are visited, so every iteration has a
        # finite row max and the online-softmax rescale never sees (-inf) - (-inf).
        for logical in range(start // BLOCK, tl.cdiv(ctx, BLOCK)):
            # int64: block * stride overflows int32 once the cache exceeds 2**31 elements
            block = tl.load(block_tables_ptr + row * stride_btb + logical * stride_btn).to(tl.int64)
            positions = logical * BLOCK + slots
            tok_mask = (positions >= start) & (positions < ctx)
            kv_offs = (block * stride_kvb + slots[:, None] * stride_kvs + kv_head * stride_kvh
                       + dims[None, :] * stride_kvd)
            kv_mask = tok_mask[:, None] & dim_mask[None, :]
            k = tl.load(k_ptr + kv_offs, mask=kv_mask, other=0.0)
            if USE_DOT:
                scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            else:
                scores = tl.sum(q[:, None, :].to(tl.float32) * k[None, :, :].to(tl.float32), axis=2)
            scores = tl.where(tok_mask[None, :], scores * qk_scale_log2, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)

            v = tl.load(v_ptr + kv_offs, mask=kv_mask, other=0.0)
            if USE_DOT:
                pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            else:
                pv = tl.sum(p[:, :, None] * v[None, :, :].to(tl.float32), axis=1)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        # Rows with context 0 (batch padding) visited no block: emit zeros, not 0/0.
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        o_offs = row * stride_ob + q_heads[:, None] * stride_oh + dims[None, :] * stride_od
        o_mask = head_mask[:, None] & dim_mask[None, :]
        tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=o_mask)


def paged_decode_attention(
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
    """Decode attention of one query token per row over its paged KV, via the Triton kernel (after
    rotating q and the new K by `rotary` and storing `new_kv`, with the reference's torch code)."""
    if triton is None:
        raise RuntimeError("paged_decode_attention needs triton; on the CPU use cpu_kernels'")
    check_paged_decode_inputs(q, kv_cache, layer, block_tables, context_lens, sliding_window, new_kv, rotary)
    if rotary is not None:
        q, new_kv = rotate_decode_inputs(q, new_kv, rotary)
    if new_kv is not None:
        store_new_kv(kv_cache, layer, block_tables, context_lens, new_kv)
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[4]
    group = num_q_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    out = torch.empty_like(q)
    if batch == 0:
        return out
    # Views, not copies: the kernel reads one layer's K and V straight out of the shared cache.
    k_cache = kv_cache[:, layer, K_INDEX]
    v_cache = kv_cache[:, layer, V_INDEX]
    _paged_decode_kernel[(batch, num_kv_heads)](
        out, q, k_cache, v_cache, block_tables, context_lens,
        scale * _LOG2E, sliding_window or 0,
        *q.stride(), *out.stride(), *k_cache.stride(), *block_tables.stride(),
        GROUP=group, GROUP_PAD=group_pad,
        HEAD_DIM=head_dim, HEAD_PAD=triton.next_power_of_2(head_dim),
        BLOCK=BLOCK_SIZE, HAS_WINDOW=sliding_window is not None, USE_DOT=group_pad >= _DOT_MIN_GROUP,
        # tf32 would cost float32 caches ~3 significant digits; 16-bit inputs keep the default.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else _DEFAULT_DOT_PRECISION,
    )
    return out
