"""The model runner: one scheduled step in, one sampled token per sequence out."""

from __future__ import annotations

import itertools

import torch

from aegaeon.engine.architecture import Architecture
from aegaeon.engine.attention import (
    MAX_PREFILL_GROUPS,
    PREFILL_GROUP_COST_PAIRS,
    AttentionBatch,
    DecodeGroup,
    PagedDecode,
    PrefillGroup,
    decode_mask,
    plan_groups,
    prefill_mask,
)
from aegaeon.engine.batcher import PrefillChunk, ScheduledStep
from aegaeon.engine.cpu_kernels import LayerKernels, cpu_decode_supports, cpu_rotary_supports
from aegaeon.engine.kv_cache import BLOCK_SIZE
from aegaeon.engine.model import Transformer
from aegaeon.engine.parallel.group import RankGroup
from aegaeon.engine.rope import RotaryTable, rotate
from aegaeon.engine.sampler import Sampler, SamplerOutput, SamplingRow, token_logprobs
from aegaeon.engine.sequence import Sequence
from aegaeon.engine.weights import ModelWeights
from aegaeon.scheduler.models import blocks_for_tokens


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

    def __init__(
        self, arch: Architecture, device: torch.device, dtype: torch.dtype, group: RankGroup | None = None
    ):
        self.arch = arch
        # Pointed at the arena by `bind` when the model is switched in; the runner owns neither.
        self.weights: ModelWeights | None = None
        self.kv_cache: torch.Tensor | None = None
        self.device = device
        self.model = Transformer(arch, device, dtype, group)
        self.rotary = RotaryTable(arch.rope, arch.head_dim, dtype, device)
        self.sampler = Sampler()
        self.scale = arch.head_dim**-0.5
        self.paged_decode = paged_decode_kernel(arch, device, self.model.cpu_kernels)
        kernels = self.model.cpu_kernels
        self.rotate = kernels.rotate if kernels is not None and cpu_rotary_supports(arch.head_dim) else rotate
        # Step inputs go to an accelerator from pinned host memory, without stalling the host.
        self._pin = device.type == "cuda"

    def bind(self, weights: ModelWeights | None, kv_cache: torch.Tensor | None) -> None:
        """Run on these weights and this KV tensor from now on (a switch: no copy, no allocation)."""
        self.weights = weights
        self.kv_cache = kv_cache

    def step(self, step: ScheduledStep) -> SamplerOutput:
        """Run one forward pass (blocks already allocated) and sample, in order, for `step.sampling`.

        Sequences that asked for prompt logprobs get those of the prompt positions this step computed.
        """
        # In the model's dtype: the sampler converts what it processes, and a greedy row's argmax is
        # the same in any dtype (no float32 copy of the [rows, vocab] logits).
        logits, scored = self._forward(step, dtype=None)
        sampling = step.sampling
        rows = [
            SamplingRow(
                seq.params,
                seq.output_token_ids,
                seq.prompt_token_ids,
                seq.generator,
                seq.grammar,
                seq.banned_token_ids,
            )
            for seq in sampling
        ]
        with torch.inference_mode():
            if scored:
                self._score_prompts(logits[len(sampling) :].float(), scored)
            return self.sampler(logits[: len(sampling)], rows)

    @torch.inference_mode()
    def logits(self, step: ScheduledStep) -> torch.Tensor:
        """float32 next-token logits `[len(step.sampling), vocab]`, writing this step's K/V into the cache."""
        return self._forward(step)[0][: len(step.sampling)]

    @torch.inference_mode()
    def _forward(
        self, step: ScheduledStep, dtype: torch.dtype | None = torch.float32
    ) -> tuple[torch.Tensor, list[tuple[Sequence, int, int]]]:
        """Logits in `dtype` (None: the model's) of the sampling positions, then of the prompt
        positions to score; those as (sequence, first position, count).

        The output projection and MLP of the last layer, the final norm and the LM head run only on
        these positions (the last of each completed prompt, every decoded token, and the prompt
        positions of sequences that asked for prompt logprobs).
        """
        scored: list[tuple[Sequence, int, int]] = []
        if step.is_prefill:
            token_ids, batch, rows = self._prefill_inputs(step.seqs, step.chunks, scored)
        else:
            token_ids, batch, rows = self._decode_inputs(step.seqs)
        hidden = self.model.forward(self.weights, self.kv_cache, token_ids, batch, rows)
        return self.model.logits(self.weights, hidden, dtype), scored

    def _score_prompts(self, logits: torch.Tensor, scored: list[tuple[Sequence, int, int]]) -> None:
        """Each scored position's logits give the logprob of the prompt token after it."""
        offset = 0
        for seq, first, count in scored:
            targets = seq.prompt_token_ids[first + 1 : first + 1 + count]
            raw = logits[offset : offset + count].log_softmax(dim=-1)
            chosen = torch.tensor(targets, dtype=torch.long, device=raw.device)
            seq.pending_prompt_logprobs.extend(
                token_logprobs(raw, chosen, [seq.params.prompt_logprobs] * count)
            )
            seq.prompt_logprobs_next = first + 1 + count
            offset += count

    def _upload(self, *columns: list[int]) -> list[torch.Tensor]:
        """int64 device tensors of `columns`, from one host tensor and one copy (async on CUDA)."""
        values = list(itertools.chain.from_iterable(columns))
        host = torch.tensor(values, dtype=torch.long, pin_memory=self._pin)
        return list(host.to(self.device, non_blocking=True).split([len(column) for column in columns]))

    def _prefill_inputs(
        self, seqs: list[Sequence], chunks: list[PrefillChunk], scored: list[tuple[Sequence, int, int]]
    ):
        """Prefill tensors, packed: chunks continuing a prompt first (a group each), then new prompts
        by length, in groups that waste little attention work on padding; `rows` are the last tokens
        of the prompts this step completes, in `seqs`' order, then the prompt positions to score
        (appended to `scored`)."""
        order = sorted(
            range(len(seqs)), key=lambda i: (chunks[i].start == 0, chunks[i].end - chunks[i].start)
        )
        lengths = [chunks[i].end - chunks[i].start for i in order]
        continuing = sum(chunks[i].start > 0 for i in order)
        spans = [(i, i + 1) for i in range(continuing)]
        if continuing < len(order):
            pairs = [n * n for n in lengths[continuing:]]  # attention work of a row, padded or not
            fresh = plan_groups(pairs, PREFILL_GROUP_COST_PAIRS, MAX_PREFILL_GROUPS)
            spans += [(continuing + start, continuing + end) for start, end in fresh]

        token_ids: list[int] = []
        positions: list[int] = []
        slot_blocks: list[int] = []
        first_token: dict[int, int] = {}  # index in seqs -> its first packed token
        for i in order:
            seq, chunk = seqs[i], chunks[i]
            first_token[i] = len(token_ids)
            token_ids.extend(seq.token_ids[chunk.start : chunk.end])
            positions.extend(range(chunk.start, chunk.end))
            slot_blocks.extend(seq.block_table[p // BLOCK_SIZE] for p in range(chunk.start, chunk.end))
        rows = [
            first_token[i] + chunk.end - chunk.start - 1
            for i, (seq, chunk) in enumerate(zip(seqs, chunks, strict=True))
            if chunk.end == seq.num_tokens
        ]
        for i, (seq, chunk) in enumerate(zip(seqs, chunks, strict=True)):
            if seq.wants_prompt_logprobs:
                first = max(chunk.start, seq.prompt_logprobs_next - 1)
                last = min(chunk.end, len(seq.prompt_token_ids) - 1)  # the last prompt token predicts output
                if last > first:
                    rows.extend(
                        range(first_token[i] + first - chunk.start, first_token[i] + last - chunk.start)
                    )
                    scored.append((seq, first, last - first))
        # Per group: where its tokens sit once right-padded (none when all rows are full length),
        # and for a continuing chunk the blocks its keys are read back from.
        paddings: list[list[int]] = []
        contexts: list[list[int]] = []
        for start, end in spans:
            group_lengths = lengths[start:end]
            width = max(group_lengths)
            ragged = any(n != width for n in group_lengths)
            paddings.append(
                [r * width + t for r, n in enumerate(group_lengths) for t in range(n)] if ragged else []
            )
            seq, chunk = seqs[order[start]], chunks[order[start]]
            contexts.append(seq.block_table[: blocks_for_tokens(chunk.end)] if chunk.start else [])
        token_ids_t, positions_t, slot_blocks_t, rows_t, *tails = self._upload(
            token_ids, positions, slot_blocks, rows, *paddings, *contexts
        )

        groups: list[PrefillGroup] = []
        packed = 0
        for (start, end), padding, context in zip(
            spans, tails[: len(spans)], tails[len(spans) :], strict=True
        ):
            chunk = chunks[order[start]]
            tokens = sum(lengths[start:end])
            query_len = max(lengths[start:end])
            key_len = chunk.end if chunk.start else query_len
            groups.append(
                PrefillGroup(
                    start=packed,
                    end=packed + tokens,
                    rows=end - start,
                    query_len=query_len,
                    key_len=key_len,
                    padding=padding if padding.numel() else None,
                    context_blocks=context if chunk.start else None,
                    mask=prefill_mask(query_len, key_len, self.arch.sliding_window, self.device),
                )
            )
            packed += tokens
        cos, sin = self.rotary.lookup(positions_t, max(chunk.end for chunk in chunks))
        batch = AttentionBatch(
            is_prefill=True,
            slot_blocks=slot_blocks_t,
            slot_offsets=positions_t % BLOCK_SIZE,
            scale=self.scale,
            cos=cos,
            sin=sin,
            rotate=self.rotate,
            prefill_groups=groups,
        )
        return token_ids_t, batch, rows_t

    def _decode_inputs(self, seqs: list[Sequence]):
        """Decode tensors with rows ordered by context length; `rows` maps them back to `seqs`' order."""
        count = len(seqs)
        order = sorted(range(count), key=lambda i: seqs[i].num_tokens)
        ordered = [seqs[i] for i in order]
        last = [seq.num_tokens - 1 for seq in ordered]
        if self.paged_decode is not None:  # the kernel walks each row's own blocks: no padding to avoid
            spans = [(0, count)]
        else:
            spans = plan_groups([len(seq.block_table) for seq in ordered])
        tables = []
        for start, end in spans:
            width = max(len(seq.block_table) for seq in ordered[start:end])
            # Padding entries point at block 0; the mask (or the context length) keeps them out.
            padded = (seq.block_table + [0] * (width - len(seq.block_table)) for seq in ordered[start:end])
            tables.append(list(itertools.chain.from_iterable(padded)))
        token_ids, positions, slot_blocks, rows, *flat_tables = self._upload(
            [seq.last_token_id for seq in ordered],
            last,
            [seq.block_table[p // BLOCK_SIZE] for seq, p in zip(ordered, last, strict=True)],
            sorted(range(count), key=order.__getitem__),  # the caller's order, from the sorted rows
            *tables,
        )
        context_lens = positions + 1
        if self.paged_decode is not None:
            context_lens = context_lens.to(torch.int32)
        groups = [
            self._decode_group(start, end, table.view(end - start, -1), context_lens)
            for (start, end), table in zip(spans, flat_tables, strict=True)
        ]
        cos, sin = self.rotary.lookup(positions, ordered[-1].num_tokens)
        batch = AttentionBatch(
            is_prefill=False,
            slot_blocks=slot_blocks,
            slot_offsets=positions % BLOCK_SIZE,
            scale=self.scale,
            cos=cos,
            sin=sin,
            rotate=self.rotate,
            decode_groups=groups,
            context_lens=context_lens,
            sliding_window=self.arch.sliding_window,
            paged_decode=self.paged_decode,
        )
        return token_ids, batch, None if order == sorted(order) else rows

    def _decode_group(
        self, start: int, end: int, tables: torch.Tensor, context_lens: torch.Tensor
    ) -> DecodeGroup:
        if self.paged_decode is not None:
            return DecodeGroup(start, end, tables.to(torch.int32), None)
        mask = decode_mask(context_lens[start:end], tables.shape[1], self.arch.sliding_window)
        return DecodeGroup(start, end, tables, mask)
