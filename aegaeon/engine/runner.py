"""The model runner: one scheduled step in, one sampled token per sequence out."""

from __future__ import annotations

import torch

from aegaeon.engine.architecture import Architecture
from aegaeon.engine.attention import (
    AttentionBatch,
    DecodeGroup,
    PagedDecode,
    decode_mask,
    plan_decode_groups,
    prefill_mask,
)
from aegaeon.engine.cpu_kernels import LayerKernels, cpu_decode_supports
from aegaeon.engine.kv_cache import BLOCK_SIZE
from aegaeon.engine.model import Transformer
from aegaeon.engine.rope import RotaryTable
from aegaeon.engine.sampler import Sampler, SamplerOutput, SamplingRow
from aegaeon.engine.sequence import Sequence
from aegaeon.engine.weights import ModelWeights


def paged_decode_kernel(
    arch: Architecture, device: torch.device, cpu_kernels: LayerKernels | None
) -> PagedDecode | None:
    """The paged decode kernel that runs on `device` for this model, or None (the gather path)."""
    if device.type == "cuda":
        from aegaeon.engine import attention_triton

        return attention_triton.paged_decode_attention if attention_triton.triton is not None else None
    if cpu_kernels is not None and cpu_decode_supports(arch.num_heads, arch.num_kv_heads, arch.head_dim):
        return cpu_kernels.paged_decode
    return None


class ModelRunner:
    """Builds the tensors of a step, runs the transformer and samples (one model, one device)."""

    def __init__(self, arch: Architecture, device: torch.device, dtype: torch.dtype):
        self.arch = arch
        # Pointed at the arena by `bind` when the model is switched in; the runner owns neither.
        self.weights: ModelWeights | None = None
        self.kv_cache: torch.Tensor | None = None
        self.device = device
        self.model = Transformer(arch, device, dtype)
        self.rotary = RotaryTable(arch.rope, arch.head_dim, dtype, device)
        self.sampler = Sampler()
        self.scale = arch.head_dim**-0.5
        self.paged_decode = paged_decode_kernel(arch, device, self.model.cpu_kernels)

    def bind(self, weights: ModelWeights | None, kv_cache: torch.Tensor | None) -> None:
        """Run on these weights and this KV tensor from now on (a switch: no copy, no allocation)."""
        self.weights = weights
        self.kv_cache = kv_cache

    def step(self, seqs: list[Sequence], is_prefill: bool) -> SamplerOutput:
        """Run one forward pass over `seqs` (their blocks already allocated) and sample."""
        logits = self.logits(seqs, is_prefill)
        rows = [
            SamplingRow(seq.params, seq.output_token_ids, seq.prompt_token_ids, seq.generator) for seq in seqs
        ]
        with torch.inference_mode():
            return self.sampler(logits, rows)

    @torch.inference_mode()
    def logits(self, seqs: list[Sequence], is_prefill: bool) -> torch.Tensor:
        """float32 next-token logits `[len(seqs), vocab]`, writing this step's K/V into the cache."""
        if is_prefill:
            token_ids, batch, last_rows = self._prefill_inputs(seqs)
        else:
            token_ids, batch, last_rows = self._decode_inputs(seqs)
        hidden = self.model.forward(self.weights, self.kv_cache, token_ids, batch)
        if last_rows is not None:
            hidden = hidden.index_select(0, last_rows)
        return self.model.logits(self.weights, hidden)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _prefill_inputs(self, seqs: list[Sequence]):
        token_ids: list[int] = []
        positions: list[int] = []
        slot_blocks: list[int] = []
        slot_offsets: list[int] = []
        seq_lens: list[int] = []
        last_rows: list[int] = []
        masks = []
        for seq in seqs:
            length = seq.num_tokens
            token_ids.extend(seq.token_ids)
            positions.extend(range(length))
            for position in range(length):
                slot_blocks.append(seq.block_table[position // BLOCK_SIZE])
                slot_offsets.append(position % BLOCK_SIZE)
            seq_lens.append(length)
            last_rows.append(len(token_ids) - 1)
            masks.append(prefill_mask(length, self.arch.sliding_window, self.device))
        cos, sin = self.rotary.lookup(self._tensor(positions), max(seq.num_tokens for seq in seqs))
        batch = AttentionBatch(
            is_prefill=True,
            slot_blocks=self._tensor(slot_blocks),
            slot_offsets=self._tensor(slot_offsets),
            scale=self.scale,
            cos=cos,
            sin=sin,
            seq_lens=seq_lens,
            prefill_masks=masks if any(mask is not None for mask in masks) else None,
        )
        rows = None if last_rows == list(range(len(token_ids))) else self._tensor(last_rows)
        return self._tensor(token_ids), batch, rows

    def _decode_inputs(self, seqs: list[Sequence]):
        """Decode tensors with rows ordered by context length; `rows` maps them back to `seqs`' order."""
        count = len(seqs)
        order = sorted(range(count), key=lambda i: seqs[i].num_tokens)
        ordered = [seqs[i] for i in order]
        last = [seq.num_tokens - 1 for seq in ordered]
        # One tensor for the per-row integers: each torch.tensor call costs more than its data.
        table = self._tensor(
            [seq.last_token_id for seq in ordered]
            + last
            + [seq.block_table[p // BLOCK_SIZE] for seq, p in zip(ordered, last, strict=True)]
        ).view(3, count)
        token_ids, positions, slot_blocks = table
        context_lens = positions + 1
        if self.paged_decode is not None:  # the kernel walks each row's own blocks: no padding to avoid
            context_lens = context_lens.to(torch.int32)
            spans = [(0, count)]
        else:
            spans = plan_decode_groups([len(seq.block_table) for seq in ordered])
        cos, sin = self.rotary.lookup(positions, ordered[-1].num_tokens)
        batch = AttentionBatch(
            is_prefill=False,
            slot_blocks=slot_blocks,
            slot_offsets=positions % BLOCK_SIZE,
            scale=self.scale,
            cos=cos,
            sin=sin,
            seq_lens=[1] * count,
            prefill_masks=None,
            decode_groups=[self._decode_group(ordered, context_lens, start, end) for start, end in spans],
            context_lens=context_lens,
            sliding_window=self.arch.sliding_window,
            paged_decode=self.paged_decode,
        )
        # Logits come back in the caller's order: undo the sort on the (small) hidden states.
        rows = None if order == sorted(order) else self._tensor(sorted(range(count), key=order.__getitem__))
        return token_ids, batch, rows

    def _decode_group(
        self, ordered: list[Sequence], context_lens: torch.Tensor, start: int, end: int
    ) -> DecodeGroup:
        rows = ordered[start:end]
        max_blocks = max(len(seq.block_table) for seq in rows)
        # Padding entries point at block 0; the mask keeps them out of every softmax.
        tables = [seq.block_table + [0] * (max_blocks - len(seq.block_table)) for seq in rows]
        if self.paged_decode is not None:
            return DecodeGroup(start, end, torch.tensor(tables, dtype=torch.int32, device=self.device), None)
        mask = decode_mask(context_lens[start:end], max_blocks, self.arch.sliding_window)
        return DecodeGroup(start, end, self._tensor(tables), mask)
