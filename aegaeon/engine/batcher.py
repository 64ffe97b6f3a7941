"""Continuous batching for one model: which sequences run in the next step.

Policy (vLLM v0 style): a step either prefills or decodes every running sequence whose prompt is
in the cache. Waiting sequences are admitted first-come first-served whenever their prompt's KV
blocks are free, while the step's token budget (`max_num_batched_tokens`) lasts; when a running
sequence needs a new block and none is free, the most recently admitted sequence is preempted (its
blocks freed, recomputed later from its prompt and output so far).

A prompt longer than the budget is prefilled in chunks over several steps (each chunk's KV written
to the cache, later chunks attending to it), so one long prompt never makes one long step: it starts
with what budget the step has left, goes on first in the next prefill steps, and a decode step of the
other running sequences runs between two of its chunks. Only the step of its last chunk samples.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from aegaeon.engine.kv_cache import BlockAllocator
from aegaeon.engine.sequence import Sequence, SequenceStatus
from aegaeon.scheduler.models import blocks_for_tokens


@dataclass(frozen=True)
class PrefillChunk:
    """The tokens `[start, end)` of a sequence that a prefill step computes (and writes KV for)."""

    start: int
    end: int


@dataclass
class ScheduledStep:
    """The sequences of one forward pass."""

    is_prefill: bool
    seqs: list[Sequence]
    # prefill: each sequence's chunk, in `seqs` order (default: each one's tokens, all of them)
    chunks: list[PrefillChunk] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.is_prefill and not self.chunks:
            self.chunks = [PrefillChunk(0, seq.num_tokens) for seq in self.seqs]

    @property
    def sampling(self) -> list[Sequence]:
        """The sequences that sample a token: every decoded one, and those whose prompt this completes."""
        if not self.is_prefill:
            return self.seqs
        return [seq for seq, chunk in zip(self.seqs, self.chunks, strict=True) if chunk.end == seq.num_tokens]

    def only(self, seqs: list[Sequence]) -> ScheduledStep:
        """This step restricted to `seqs` (a subset, in order), e.g. those whose KV has landed."""
        if len(seqs) == len(self.seqs):
            return self
        kept = set(map(id, seqs))
        chunks = [chunk for seq, chunk in zip(self.seqs, self.chunks, strict=True) if id(seq) in kept]
        return ScheduledStep(self.is_prefill, seqs, chunks)


class ContinuousBatcher:
    """Admits, runs, preempts and retires sequences over one KV block allocator."""

    def __init__(self, allocator: BlockAllocator, max_num_seqs: int, max_num_batched_tokens: int):
        self.allocator = allocator
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.swapped: list[Sequence] = []
        # Running (or swapped) sequences part-way through their prompt: tokens whose KV is cached.
        self.prefilled: dict[Sequence, int] = {}
        # A prompt went on in chunks last step: the next step decodes the others, if any.
        self._decode_next = False

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> ScheduledStep | None:
        """The next step's work, with KV blocks allocated for it; None when idle."""
        if self._decode_next:
            self._decode_next = False
            step = self._decode_step()
            if step is not None:
                return step
        step = self._prefill_step()
        if step is not None:
            self._decode_next = any(
                chunk.end < seq.num_tokens for seq, chunk in zip(step.seqs, step.chunks, strict=True)
            )
            return step
        return self._decode_step()

    def _decode_step(self) -> ScheduledStep | None:
        self._reserve_decode_slots()
        decoding = [seq for seq in self.running if seq not in self.prefilled]
        return ScheduledStep(is_prefill=False, seqs=decoding) if decoding else None

    def _prefill_step(self) -> ScheduledStep | None:
        """Prompts in progress go on first, then waiting ones are admitted, within the token budget."""
        budget = self.max_num_batched_tokens
        seqs: list[Sequence] = []
        chunks: list[PrefillChunk] = []
        for seq in self.running:
            if budget == 0:
                break
            start = self.prefilled.get(seq)
            if start is None:
                continue
            if seq.kv_arrival is not None:  # swapped back in: its earlier chunks' KV must be there
                seq.kv_arrival.wait()
                seq.kv_arrival = None
            end = min(seq.num_tokens, start + budget)
            seqs.append(seq)
            chunks.append(PrefillChunk(start, end))
            budget -= end - start
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            needed = blocks_for_tokens(seq.num_tokens)
            # A prompt that fits the budget runs whole; a longer one starts with what is left.
            too_long = budget < seq.num_tokens <= self.max_num_batched_tokens
            if too_long or needed > self.allocator.num_free:
                break
            self.waiting.popleft()
            seq.block_table = self.allocator.allocate(needed)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            end = min(seq.num_tokens, budget)
            seqs.append(seq)
            chunks.append(PrefillChunk(0, end))
            budget -= end
        for seq, chunk in zip(seqs, chunks, strict=True):
            if chunk.end < seq.num_tokens:
                self.prefilled[seq] = chunk.end
            else:
                self.prefilled.pop(seq, None)
        return ScheduledStep(is_prefill=True, seqs=seqs, chunks=chunks) if seqs else None

    def finish(self, seq: Sequence) -> None:
        """Retire a sequence (finished or aborted) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.swapped:
            self.swapped.remove(seq)
        self._release(seq)
        self.prefilled.pop(seq, None)
        seq.status = SequenceStatus.FINISHED

    def swap_out(self, seq: Sequence) -> list[int]:
        """Take a running sequence off the device; its blocks go back to the caller, to be freed
        once the copy that reads them has completed."""
        self.running.remove(seq)
        blocks, seq.block_table = seq.block_table, []
        seq.status = SequenceStatus.SWAPPED
        self.swapped.append(seq)
        return blocks

    def drop(self, seq: Sequence) -> None:
        """Take a running or waiting sequence off the device without keeping its KV: it waits swapped
        out, to be recomputed from its prompt and output so far once `requeue`d."""
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._release(seq)
        self.prefilled.pop(seq, None)  # recomputed from its first token
        seq.status = SequenceStatus.SWAPPED
        self.swapped.append(seq)

    def requeue(self, seq: Sequence) -> None:
        """A swapped-out sequence without KV waits, first in line, for its prefill (prompt and output)."""
        self.swapped.remove(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def swap_in(self, seq: Sequence) -> list[int]:
        """Give a swapped sequence device blocks for its KV again and make it running."""
        seq.block_table = self.allocator.allocate(len(seq.host_blocks))
        self.swapped.remove(seq)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return seq.block_table

    def _reserve_decode_slots(self) -> None:
        """Give every running sequence room for the token it decodes next, preempting if needed."""
        for seq in list(self.running):
            if seq not in self.running:
                continue  # preempted while making room for an earlier sequence
            needed = blocks_for_tokens(seq.num_tokens) - len(seq.block_table)
            while needed > self.allocator.num_free and self.running[-1] is not seq:
                self._preempt(self.running[-1])
            if needed > self.allocator.num_free:
                self._preempt(seq)
                continue
            if needed > 0:
                seq.block_table.extend(self.allocator.allocate(needed))

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks; it waits again and is recomputed from its tokens."""
        self._preempt(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        self.prefilled.pop(seq, None)  # recomputed from its first token
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        if seq.kv_arrival is not None:  # a copy still writes these blocks: let it land first
            seq.kv_arrival.synchronize()
            seq.kv_arrival = None
        self.allocator.free(seq.block_table)
        seq.block_table = []
