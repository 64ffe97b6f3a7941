"""KV moves between the device and the host KV pool, and what each move holds until it completes.

A move is a batch of block copies ending in an event. The blocks it reads stay allocated until it
completes (a swap-out's device blocks, a swap-in's host blocks); a sequence whose KV is still
arriving is run only once it has landed.

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
from aegaeon.memory.kv_pool import HostKVPool, HostKVPoolFullError


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

    def swap_out(self, served: ServedModel, seq: Sequence) -> bool:
        """Start copying a running sequence's KV to the host pool; its device blocks free on completion.

        When the pool cannot hold it now, the KV is dropped instead (a preemption by recompute): the
        sequence waits swapped out without host blocks and is prefilled again from its prompt and
        output so far when swapped in, which under greedy decoding continues exactly. A full pool is
        momentary back-pressure, never a failure. True if the KV was kept.
        """
        if self.kv_pool is None:  # nowhere to keep it (a tensor-parallel engine): recomputed later
            served.batcher.drop(seq)
            return False
        if seq.kv_arrival is not None:
            seq.kv_arrival.wait()
            seq.kv_arrival = None
        self.reap()  # completed swap-ins give their host blocks back first
        handles = self._host_blocks(served, seq)
        if handles is None:
            served.batcher.drop(seq)
            return False
        copy = self.kv_pool.copy_from_device(
            self.copies, handles, served.runner.kv_cache, seq.block_table, self.shard.rank, self.shard.size
        )
        blocks = served.batcher.swap_out(seq)
        seq.host_blocks = handles
        # The device blocks are reused only once the copy that reads them has completed.
        self._moves.append((copy, lambda: served.batcher.allocator.free(blocks)))
        if self.shard.size > 1:
            self.finish()
        return True

    def _host_blocks(self, served: ServedModel, seq: Sequence) -> list[int] | None:
        """Host blocks for `seq`'s KV, or None when the pool has no room for it now."""
        if self.shard.rank > 0:
            return self.decisions.pop(seq.seq_id)
        # Under TP a host block holds every rank's part: as many layers, times the ranks.
        shape = dataclasses.replace(served.kv_shape, layers=served.kv_shape.layers * self.shard.size)
        try:
            handles = self.kv_pool.allocate(shape, len(seq.block_table))
        except HostKVPoolFullError:
            handles = None
        if self.shard.size > 1:
            self.decided[seq.seq_id] = handles
        return handles

    def _free_host_blocks(self, handles: list[int]) -> None:
        if self.shard.size == 1:
            self.kv_pool.free(handles)
        elif self.shard.rank == 0:
            self.released.extend(handles)

    def swap_in(self, served: ServedModel, seq: Sequence) -> bool:
        """Bring a swapped-out sequence back: start copying its KV in (a step runs it once
        `kv_arrival` is done), or, if its KV was dropped, queue it to be recomputed. False if the
        device has no blocks for it now: it stays swapped out and waits."""
        self.reap()
        if not seq.host_blocks:
            served.batcher.requeue(seq)
            return True
        allocator = served.batcher.allocator
        if len(seq.host_blocks) > allocator.num_free:
            self.finish()  # swap-outs still copying hold device blocks until they complete
            if len(seq.host_blocks) > allocator.num_free:
                return False
        blocks = served.batcher.swap_in(seq)
        copy = self.kv_pool.copy_to_device(
            self.copies, seq.host_blocks, served.runner.kv_cache, blocks, self.shard.rank, self.shard.size
        )
        host_blocks, seq.host_blocks = seq.host_blocks, []
        seq.kv_arrival = copy
        self._moves.append((copy, lambda: self._free_host_blocks(host_blocks)))
        if self.shard.size > 1:
            self.finish()
            seq.kv_arrival = None
        return True

    def evict(self, served: ServedModel) -> None:
        """Take every running sequence of `served` off the device and wait for all moves.

        Swapped out to the host pool (their KV dropped, to be recomputed, where the pool is full), or
        with no pool preempted (recomputed later); the moves must finish because the KV region is
        about to be read with another block shape.
        """
        for seq in list(served.batcher.running):
            if self.kv_pool is not None:
                self.swap_out(served, seq)
            else:
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
