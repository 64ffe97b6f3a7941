"""KV moves between the device and the host KV pool, and what each move holds until it completes.

A move is a batch of block copies ending in an event. The blocks it reads stay allocated until it
completes (a swap-out's device blocks, a swap-in's host blocks); a sequence whose KV is still
arriving is run only once it has landed.
"""

from __future__ import annotations

from collections.abc import Callable

from aegaeon.engine.residency import ServedModel
from aegaeon.engine.sequence import Sequence
from aegaeon.memory.copies import Copy, CopyStream
from aegaeon.memory.kv_pool import HostKVPool, HostKVPoolFullError


class KVMover:
    """Swaps sequences' KV out to the host KV pool and back in, off the compute path."""

    def __init__(self, copies: CopyStream, kv_pool: HostKVPool | None):
        self.copies = copies
        self.kv_pool = kv_pool
        # KV copies not yet known complete, with what to release once they are.
        self._moves: list[tuple[Copy, Callable[[], None]]] = []

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
        try:
            handles = self.kv_pool.allocate(served.kv_shape, len(seq.block_table))
        except HostKVPoolFullError:
            served.batcher.drop(seq)
            return False
        copy = self.kv_pool.copy_from_device(self.copies, handles, served.runner.kv_cache, seq.block_table)
        blocks = served.batcher.swap_out(seq)
        seq.host_blocks = handles
        # The device blocks are reused only once the copy that reads them has completed.
        self._moves.append((copy, lambda: served.batcher.allocator.free(blocks)))
        return True

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
        copy = self.kv_pool.copy_to_device(self.copies, seq.host_blocks, served.runner.kv_cache, blocks)
        host_blocks, seq.host_blocks = seq.host_blocks, []
        seq.kv_arrival = copy
        self._moves.append((copy, lambda: self.kv_pool.free(host_blocks)))
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
            self.kv_pool.free(seq.host_blocks)
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
