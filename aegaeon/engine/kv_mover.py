"""KV moves between the device and the host KV pool, and what each move holds until it completes.

A move is a batch of block copies ending in an event: all the blocks of the sequences swapped
together, one copy per run of blocks consecutive on both sides. The blocks it reads stay allocated
until it completes (a swap-out's device blocks, a swap-in's host blocks); a sequence whose KV is
still arriving is run only once it has landed.

Under tensor parallelism (a `shard` of several ranks) a host block holds every rank's KV of its
tokens, rank r's at part r, and each rank copies only its part. Rank 0 decides: it allocates the
host blocks (or drops the KV when the pool is full) and records each decision in `decided`, which
the other ranks are handed as `decisions`; it never frees a host block at once (`released`, freed
once every rank is past its reads). Moves complete before returning, so every rank's device
blocks are freed, and its sequences land, exactly when rank 0's are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from aegaeon.engine.parallel.shards import WHOLE_MODEL, Shard
from aegaeon.engine.residency import ServedModel
from aegaeon.engine.sequence import Sequence
from aegaeon.memory.copies import Copy, CopyStream
from aegaeon.memory.kv_pool import HostKVPool


class KVMover:
    """Swaps sequences' KV out to the host KV pool and back in, off the compute path."""

    def __init__(self, copies: CopyStream, kv_pool: HostKVPool | None, shard: Shard = WHOLE_MODEL):
        self.copies = copies
        self.kv_pool = kv_pool
        self.shard = shard
        # KV copies not yet known complete, with what to release once they are.
        self._moves: list[tuple[Copy, Callable[[], None]]] = []
        # Tensor parallelism: host blocks (None: dropped) by sequence id, as rank 0 chose them.
        self.decided: dict[int, list[int] | None] = {}
        self.decisions: dict[int, list[int] | None] = {}
        # Host blocks rank 0 is done with; freed by its engine once no rank reads them any more.
        self.released: list[int] = []

    def swap_out(self, served: ServedModel, seqs: list[Sequence]) -> list[bool]:
        """Start copying running sequences' KV to the host pool, all in one move; their device blocks
        free once it completes.

        A sequence whose KV the pool cannot hold now is dropped instead (a preemption by recompute):
        it waits swapped out without host blocks and is prefilled again from its prompt and output so
        far when swapped in, which under greedy decoding continues exactly. A full pool is momentary
        back-pressure, never a failure. Per sequence: True if its KV was kept.
        """
        if self.kv_pool is None:  # nowhere to keep it (a tensor-parallel engine): recomputed later
            for seq in seqs:
                served.batcher.drop(seq)
            return [False] * len(seqs)
        for seq in seqs:
            if seq.kv_arrival is not None:
                seq.kv_arrival.wait()
                seq.kv_arrival = None
        self.reap()  # completed swap-ins give their host blocks back first
        allocated = self._host_blocks(served, seqs)
        kept = [
            (seq, host_blocks)
            for seq, host_blocks in zip(seqs, allocated, strict=True)
            if host_blocks is not None
        ]
        if kept:
            handles = [handle for _, host_blocks in kept for handle in host_blocks]
            blocks = [block for seq, _ in kept for block in seq.block_table]
            copy = self.kv_pool.copy_from_device(
                self.copies, handles, served.runner.kv_cache, blocks, self.shard.rank, self.shard.size
            )
            for seq, host_blocks in kept:
                served.batcher.swap_out(seq)
                seq.host_blocks = host_blocks
            # The device blocks are reused only once the copy that reads them has completed.
            self._moves.append((copy, lambda: served.batcher.allocator.free(blocks)))
        for seq, host_blocks in zip(seqs, allocated, strict=True):
            if host_blocks is None:
                served.batcher.drop(seq)
        if self.shard.size > 1:
            self.finish()
        return [host_blocks is not None for host_blocks in allocated]

    def _host_blocks(self, served: ServedModel, seqs: list[Sequence]) -> list[list[int] | None]:
        """Host blocks for each sequence's KV, None for one the pool has no room for now."""
        if self.shard.rank > 0:
            return [self.decisions.pop(seq.seq_id) for seq in seqs]
        # Under TP a host block holds every rank's part: as many layers, times the ranks.
        shape = dataclasses.replace(served.kv_shape, layers=served.kv_shape.layers * self.shard.size)
        allocated = self.kv_pool.allocate_each(shape, [len(seq.block_table) for seq in seqs])
        if self.shard.size > 1:
            for seq, host_blocks in zip(seqs, allocated, strict=True):
                self.decided[seq.seq_id] = host_blocks
        return allocated

    def _free_host_blocks(self, handles: list[int]) -> None:
        if self.shard.size == 1:
            self.kv_pool.free(handles)
        elif self.shard.rank == 0:
            self.released.extend(handles)

    def swap_in(self, served: ServedModel, seqs: list[Sequence]) -> list[bool]:
        """Bring swapped-out sequences back, in order: the KV of those that kept it starts moving in,
        all in one move (a step runs each once `kv_arrival` is done); those whose KV was dropped are
        queued to be recomputed. Per sequence: False if the device has no blocks for it now (it stays
        swapped out and waits)."""
        self.reap()
        allocator = served.batcher.allocator
        if sum(len(seq.host_blocks) for seq in seqs) > allocator.num_free:
            self.finish()  # swap-outs still copying hold device blocks until they complete
        placed: list[bool] = []
        moving: list[Sequence] = []
        handles: list[int] = []
        blocks: list[int] = []
        for seq in seqs:
            if len(seq.host_blocks) > allocator.num_free:
                placed.append(False)  # it stays swapped out
                continue
            placed.append(True)
            if not seq.host_blocks:
                served.batcher.requeue(seq)
                continue
            handles += seq.host_blocks
            blocks += served.batcher.swap_in(seq)
            seq.host_blocks = []
            moving.append(seq)
        if handles:
            copy = self.kv_pool.copy_to_device(
                self.copies, handles, served.runner.kv_cache, blocks, self.shard.rank, self.shard.size
            )
            for seq in moving:
                seq.kv_arrival = copy
            self._moves.append((copy, lambda: self._free_host_blocks(handles)))
            if self.shard.size > 1:
                self.finish()
                for seq in moving:
                    seq.kv_arrival = None
        return placed

    def evict(self, served: ServedModel) -> None:
        """Take every running sequence of `served` off the device and wait for all moves.

        Swapped out to the host pool (their KV dropped, to be recomputed, where the pool is full), or
        with no pool preempted (recomputed later); the moves must finish because the KV region is
        about to be read with another block shape.
        """
        if self.kv_pool is not None:
            self.swap_out(served, list(served.batcher.running))
        else:
            for seq in list(served.batcher.running):
                served.batcher.preempt(seq)
        self.finish()

    def free_host(self, seq: Sequence) -> None:
        """Return a sequence's host KV blocks to the pool (it ended while swapped out)."""
        if seq.host_blocks:
            self._free_host_blocks(seq.host_blocks)
            seq.host_blocks = []

    def reap(self) -> None:
        """Release what completed moves held."""
        pending = []
        for copy, release in self._moves:
            if copy.done():
                copy.wait()
                release()
            else:
                pending.append((copy, release))
        self._moves = pending

    def finish(self) -> None:
        """Wait for every move, host included, and release what they held."""
        for copy, release in self._moves:
            copy.synchronize()
            release()
        self._moves = []

    @staticmethod
    def landed(seqs: list[Sequence]) -> list[Sequence]:
        """The sequences whose KV is on the device; waits for the first arrival if none has landed."""
        landed = [seq for seq in seqs if seq.kv_arrival is None or seq.kv_arrival.done()]
        if not landed:
            landed = [seqs[0]]
        for seq in landed:
            if seq.kv_arrival is not None:
                seq.kv_arrival.wait()
                seq.kv_arrival = None
        return landed
