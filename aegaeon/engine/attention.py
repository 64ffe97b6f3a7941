"""Paged attention over the block-major KV cache.

The per-step metadata (`AttentionBatch`) is built once by the runner and passed explicitly to every
layer; there is no global forward context, so two models can run in one process.

- Prefill: each new prompt attends causally to its own tokens, which are all in hand, so the
  attention runs on the fresh K/V while they are written into the cache. Prompts of similar length
  run as one 4-D SDPA call (`[rows, heads, len, head_dim]`, right-padded to the longest; grouped-query
  attention via `enable_gqa`, K/V never repeated), so SDPA takes its fused kernels. A chunk that
  continues a prompt prefilled over several steps attends to the earlier chunks' K/V, read back from
  the paged cache, with its queries aligned to the last keys (lower-right causal).
- Decode: one query token per sequence against its cached context. A paged kernel reads the blocks
  in place: Triton on CUDA (attention_triton.py), C on the CPU (cpu_kernels.py). Where neither
  can run, K and V are gathered per block table into `[batch, kv_heads, tokens, head_dim]` views
  and handed to SDPA with the query grouped as `[batch, kv_heads, group, head_dim]` (grouped-query
  attention without repeating K/V).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, causal_lower_right

from aegaeon.engine.kv_cache import BLOCK_SIZE
from aegaeon.engine.rope import rotate

# A decode group costs a few extra ops per layer; splitting pays when it saves more padded blocks
# than this (one block per layer is ~4 us of gathering and attending on the CPU; a group, ~30 us).
DECODE_GROUP_COST_BLOCKS = 8
MAX_DECODE_GROUPS = 4
# A prefill group costs one SDPA call per layer plus padding copies, about what attending this many
# query-key pairs costs on the CPU; splitting pays when it saves more padded pairs than this.
PREFILL_GROUP_COST_PAIRS = 4096
MAX_PREFILL_GROUPS = 8


@dataclass
class DecodeGroup:
    """Consecutive decode rows `[start, end)` attended together, padded to their longest context."""

    start: int
    end: int
    block_tables: torch.Tensor  # [rows, max_blocks]
    mask: torch.Tensor | None  # [rows, 1, 1, max_blocks * BLOCK_SIZE], True where a key is visible


@dataclass
class PrefillGroup:
    """Prompts (or one chunk of a prompt) of a prefill step attended in one SDPA call: the packed
    tokens `[start, end)`, as `rows` rows of `query_len` queries (right-padded) over `key_len` keys."""

    start: int
    end: int
    rows: int
    query_len: int
    key_len: int
    # each token's row in the padded `[rows * query_len]` layout; None: all rows are full length
    padding: torch.Tensor | None
    # a chunk continuing a prompt (one row): the cache blocks of its first `key_len` tokens, which
    # hold the earlier chunks' K/V and this one's; None: the keys are this step's fresh K/V
    context_blocks: torch.Tensor | None
    # which keys each query sees (`prefill_mask`); None: plain causal (`is_causal`)
    mask: torch.Tensor | CausalBias | None


# (q, k, cos, signed_sin) -> None, rotating q and k in place (rope.rotate, or the CPU kernel's)
Rotate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
# (q, kv_cache, layer, block_tables, context_lens, scale, sliding_window, new_kv=, rotary=)
#   -> [rows, heads, head_dim]
# (semantics: paged_decode.py)
PagedDecode = Callable[..., torch.Tensor]


@dataclass
class AttentionBatch:
    """Where this step's tokens go in the KV cache and what each query may attend to."""

    is_prefill: bool
    slot_blocks: torch.Tensor  # [tokens] block id of each new token
    slot_offsets: torch.Tensor  # [tokens] offset of each new token within its block
    scale: float
    # cos and signed sin of each token's position, [tokens, 1, head_dim] (RotaryTable.lookup)
    cos: torch.Tensor
    sin: torch.Tensor
    # how q and k are rotated to their positions (where the paged decode kernel does not)
    rotate: Rotate = rotate
    # prefill: the groups of packed prompts attended together, in packing order
    prefill_groups: list[PrefillGroup] | None = None
    # decode: rows grouped by context length, and each row's context length (new token included)
    decode_groups: list[DecodeGroup] | None = None
    context_lens: torch.Tensor | None = None
    sliding_window: int | None = None
    # decode: the paged kernel reading the blocks in place (one group, int32 tables); None: gather
    paged_decode: PagedDecode | None = None


def plan_groups(
    sizes: list[int], group_cost: int = DECODE_GROUP_COST_BLOCKS, max_groups: int = MAX_DECODE_GROUPS
) -> list[tuple[int, int]]:
    """Split rows into at most `max_groups` groups of consecutive rows `[start, end)`, each padded to
    its largest size (blocks, tokens, query-key pairs), so that little padding is wasted; a split
    must save more than `group_cost`."""
    groups = [(0, len(sizes))]
    while len(groups) < max_groups:
        best_saving, best = 0, None
        for g, (start, end) in enumerate(groups):
            part = sizes[start:end]
            prefix = list(itertools.accumulate(part, max))
            suffix = list(itertools.accumulate(reversed(part), max))[::-1]
            whole = len(part) * prefix[-1]
            for cut in range(1, len(part)):
                # Rows before the cut pad to their own largest size, rows after it to theirs.
                saving = whole - cut * prefix[cut - 1] - (len(part) - cut) * suffix[cut] - group_cost
                if saving > best_saving:
                    best_saving, best = saving, (g, start + cut)
        if best is None:
            break
        g, split = best
        start, end = groups[g]
        groups[g : g + 1] = [(start, split), (split, end)]
    return groups


def prefill_mask(
    query_len: int, key_len: int, sliding_window: int | None, device: torch.device
) -> torch.Tensor | CausalBias | None:
    """Which of a prompt's first `key_len` keys each of its last `query_len` tokens sees: causal,
    within the sliding window (`q - k < window`). None where plain causal (`is_causal`) suffices;
    causal aligned to the last key (lower right) for a chunk after earlier ones and no window."""
    if sliding_window is None or key_len <= sliding_window:
        return None if query_len == key_len else causal_lower_right(query_len, key_len)
    queries = torch.arange(key_len - query_len, key_len, device=device)
    distance = queries[:, None] - torch.arange(key_len, device=device)[None, :]
    return (distance >= 0) & (distance < sliding_window)


def decode_mask(context_lens: torch.Tensor, max_blocks: int, sliding_window: int | None) -> torch.Tensor:
    """`[rows, 1, 1, max_blocks * BLOCK_SIZE]`: keys inside each context (and window)."""
    positions = torch.arange(max_blocks * BLOCK_SIZE, device=context_lens.device)
    lens = context_lens[:, None]
    mask = positions[None, :] < lens
    if sliding_window is not None:
        mask &= positions[None, :] > lens - 1 - sliding_window
    return mask[:, None, None, :]


def write_kv(kv_cache: torch.Tensor, layer: int, batch: AttentionBatch, kv: torch.Tensor) -> None:
    """Store this step's K and V (`kv`: `[tokens, 2, kv_heads, head_dim]`) at their slots."""
    kv_cache[batch.slot_blocks, layer, :, batch.slot_offsets] = kv


def attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    kv_cache: torch.Tensor,
    layer: int,
    batch: AttentionBatch,
) -> torch.Tensor:
    """Attention output `[tokens, heads * head_dim]` for this step's queries `[tokens, heads, head_dim]`
    and keys and values `kv` (`[tokens, 2, kv_heads, head_dim]`), not yet rotated: q and k are rotated
    to their positions here, and k and v stored for later steps."""
    if batch.paged_decode is not None and not batch.is_prefill:
        # The kernel rotates and stores this step's K/V itself, in the same pass over the rows.
        tables = batch.decode_groups[0].block_tables
        out = batch.paged_decode(
            q, kv_cache, layer, tables, batch.context_lens, batch.scale, batch.sliding_window,
            new_kv=kv, rotary=(batch.cos, batch.sin),
        )  # fmt: skip
        return out.flatten(1)
    # In place: q and kv are this layer's own (views of its qkv product, or fresh tensors).
    batch.rotate(q, kv[:, 0], batch.cos, batch.sin)
    write_kv(kv_cache, layer, batch, kv)
    if batch.is_prefill:
        return _prefill(q, kv, kv_cache, layer, batch)
    outputs = [
        _decode_gathered(q[group.start : group.end], kv_cache, layer, group, batch.scale)
        for group in batch.decode_groups
    ]
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def _prefill(
    q: torch.Tensor, kv: torch.Tensor, kv_cache: torch.Tensor, layer: int, batch: AttentionBatch
) -> torch.Tensor:
    outputs = [_prefill_group(q, kv, kv_cache, layer, group, batch.scale) for group in batch.prefill_groups]
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def _prefill_group(
    q: torch.Tensor, kv: torch.Tensor, kv_cache: torch.Tensor, layer: int, group: PrefillGroup, scale: float
) -> torch.Tensor:
    """`[tokens, heads * head_dim]` for the group's packed tokens, from one 4-D SDPA call."""
    tokens = slice(group.start, group.end)
    num_heads, head_dim = q.shape[1], q.shape[2]
    if group.context_blocks is not None:
        # K and V of the whole prompt so far: earlier chunks' from the cache (this chunk's too, just written).
        num_kv_heads = kv.shape[2]
        k, v = (
            kv_cache[:, layer, i]
            .index_select(0, group.context_blocks)
            .view(1, -1, num_kv_heads, head_dim)[:, : group.key_len]
            for i in (0, 1)
        )
        grouped_q = q[tokens].unsqueeze(0)
    elif group.padding is None:  # rows of equal length: the packed tokens are already [rows, len]
        grouped_q = q[tokens].view(group.rows, group.query_len, num_heads, head_dim)
        grouped_kv = kv[tokens].view(group.rows, group.query_len, *kv.shape[1:])
        k, v = grouped_kv[:, :, 0], grouped_kv[:, :, 1]
    else:
        grouped_q = _pad(q[tokens], group)
        grouped_kv = _pad(kv[tokens], group)
        k, v = grouped_kv[:, :, 0], grouped_kv[:, :, 1]
    # [rows, heads, len, head_dim] views: SDPA reads the strides as they are, K/V shared per group.
    out = F.scaled_dot_product_attention(
        grouped_q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=group.mask,
        is_causal=group.mask is None,
        scale=scale,
        enable_gqa=True,
    )
    out = out.transpose(1, 2).reshape(group.rows * group.query_len, num_heads * head_dim)
    return out if group.padding is None else out.index_select(0, group.padding)


def _pad(x: torch.Tensor, group: PrefillGroup) -> torch.Tensor:
    """The group's packed tokens `[tokens, ...]` as `[rows, query_len, ...]`, zeros after each row's end
    (finite numbers: a padded key is masked out, and a padded query's output is dropped)."""
    padded = x.new_zeros(group.rows * group.query_len, *x.shape[1:])
    padded.index_copy_(0, group.padding, x)
    return padded.view(group.rows, group.query_len, *x.shape[1:])


def _decode_gathered(
    q: torch.Tensor, kv_cache: torch.Tensor, layer: int, group: DecodeGroup, scale: float
) -> torch.Tensor:
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[4]
    tokens = group.block_tables.shape[1] * BLOCK_SIZE
    blocks = group.block_tables.flatten()
    # Gathering K and V separately keeps each a plain [rows, tokens, kv_heads, dim] tensor, which
    # SDPA reads through a transposed view with no further copy.
    k = kv_cache[:, layer, 0].index_select(0, blocks).view(num_seqs, tokens, num_kv_heads, head_dim)
    v = kv_cache[:, layer, 1].index_select(0, blocks).view(num_seqs, tokens, num_kv_heads, head_dim)
    grouped_q = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(
        grouped_q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=group.mask, scale=scale
    )
    return out.reshape(num_seqs, num_heads * head_dim)
