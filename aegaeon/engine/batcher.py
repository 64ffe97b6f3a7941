"""Continuous batching for one model: which sequences run in the next step.

Policy (vLLM v0 style): a step either prefills newly admitted sequences or decodes every running
one. Waiting sequences are admitted first-come first-served whenever their prompt's KV blocks are
free; when a running sequence needs a new block and none is free, the most recently admitted
sequence is preempted (its blocks freed, recomputed later from its prompt and output so far).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from aegaeon.engine.kv_cache import BlockAllocator, blocks_for_tokens
from aegaeon.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledStep:
    """The sequences of one forward pass."""

    is_prefill: bool
    seqs: list[Sequence]


class ContinuousBatcher:
    """Admits, runs, preempts and retires sequences over one KV block allocator."""

    def __init__(self, allocator: BlockAllocator, max_num_seqs: int, max_num_batched_tokens: int):
        self.allocator = allocator
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.swapped: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def schedule(self) -> ScheduledStep | None:
        """The next step's work, with KV blocks allocated for it; None when idle."""
        admitted = self._admit()
        if admitted:
            return ScheduledStep(is_prefill=True, seqs=admitted)
        self._reserve_decode_slots()
        if self.running:
            return ScheduledStep(is_prefill=False, seqs=list(self.running))
        return None

    def finish(self, seq: Sequence) -> None:
        """Retire a sequence (finished or aborted) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.swapped:
            self.swapped.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.FINISHED

    def swap_out(self, seq: Sequence) -> list[int]:
        """Take a running sequence off the device; its blocks go back to the caller, to be freed
        once the copy that reads them has completed."""
        self.running.remove(seq)
        blocks, seq.block_table = seq.block_table, []
        seq.status = SequenceStatus.SWAPPED
        self.swapped.append(seq)
        return blocks

    def swap_in(self, seq: Sequence) -> list[int]:
        """Give a swapped sequence device blocks for its KV again and make it running."""
        seq.block_table = self.allocator.allocate(len(seq.host_blocks))
        self.swapped.remove(seq)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return seq.block_table

    def _admit(self) -> list[Sequence]:
        admitted: list[Sequence] = []
        budget = self.max_num_batched_tokens
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            needed = blocks_for_tokens(seq.num_tokens)
            # A prompt longer than the token budget still runs, alone, rather than never.
            over_budget = seq.num_tokens > budget and admitted
            if over_budget or needed > self.allocator.num_free:
                break
            self.waiting.popleft()
            seq.block_table = self.allocator.allocate(needed)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            admitted.append(seq)
            budget -= seq.num_tokens
        return admitted

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
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        if seq.kv_arrival is not None:  # a copy still writes these blocks: let it land first
            seq.kv_arrival.synchronize()
            seq.kv_arrival = None
        self.allocator.free(seq.block_table)
        seq.block_table = []
