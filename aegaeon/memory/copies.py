"""Copies between host and device memory that run beside the computation, each ending in an event.

Scale-ups (a model's byte range in chunks) and KV swaps (a request's blocks, one copy per run of
blocks that are consecutive on both sides: `block_runs`) both go through a `CopyStream`. On CUDA the
copies are issued on a dedicated stream of the engine's device from page-locked host memory and an
event marks their end, so the compute stream keeps working meanwhile and later waits only on what
it reads. Every stream and event call names that device: the current device of the process may be
another one. On the CPU there is no second engine to copy with: a copy runs inline, or on a
background thread when asked (a memmove releases the GIL), and its thread marks its end.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from aegaeon.config import MIB

CopyPairs = Sequence[tuple[torch.Tensor, torch.Tensor]]  # (target, source)
Run = tuple[int, int, int]  # (target offset, source offset, bytes)
# A CPU copy of fewer bytes runs on the calling thread alone: handing a share of it to another
# thread would cost more than it saves.
PARALLEL_COPY_MIN_BYTES = 4 * MIB


def block_runs(targets: Sequence[int], sources: Sequence[int], block_bytes: int) -> list[Run]:
    """(target offset, source offset, bytes) of each run of blocks consecutive on both sides.

    `targets[i]` and `sources[i]` are the byte offsets of block i of a move; copying the runs copies
    every block, in as few copies as the two layouts allow. (A loop: moves are tens to hundreds of
    blocks, where numpy's per-call cost is larger than the loop's.)
    """
    runs: list[list[int]] = []
    for target, source in zip(targets, sources, strict=True):
        last = runs[-1] if runs else None
        if last is not None and target == last[0] + last[2] and source == last[1] + last[2]:
            last[2] += block_bytes
        else:
            runs.append([target, source, block_bytes])
    return [(target, source, nbytes) for target, source, nbytes in runs]


def split_ranges(ranges: list[Run], parts: int) -> list[list[Run]]:
    """`ranges` of (target, source, bytes) cut into `parts` shares of about equal bytes, in order."""
    share = -(-sum(nbytes for _, _, nbytes in ranges) // parts)
    shares: list[list[Run]] = [[]]
    room = share
    for target, source, nbytes in ranges:
        while nbytes:
            if room == 0:
                shares.append([])
                room = share
            take = min(nbytes, room)
            shares[-1].append((target, source, take))
            target, source, nbytes, room = target + take, source + take, nbytes - take, room - take
    return shares


def memmove_all(ranges: list[Run]) -> None:
    for target, source, nbytes in ranges:
        ctypes.memmove(target, source, nbytes)


class Copy:
    """A batch of copies in flight, or already done."""

    def __init__(self, event: torch.cuda.Event | None = None, device: torch.device | None = None):
        self._event = event
        self._device = device  # the device whose compute stream waits on the event
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        if self._event is not None:
            return self._event.query()
        return self._thread is None or not self._thread.is_alive()

    def wait(self) -> None:
        """Return when the compute stream may read the copied bytes (on CUDA, without stalling the host)."""
        if self._event is not None:
            torch.cuda.current_stream(self._device).wait_event(self._event)
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error

    def synchronize(self) -> None:
        """Return when the copy has finished, host included (before its source may be reused)."""
        if self._event is not None:
            self._event.synchronize()
        self.wait()


class CopyStream:
    """Issues copies off the compute path of one device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._threads = torch.get_num_threads() if self.stream is None else 1
        self._helpers = (
            ThreadPoolExecutor(self._threads - 1, thread_name_prefix="aegaeon-copy")
            if self._threads > 1
            else None
        )

    def copy(self, pairs: CopyPairs, background: bool = False) -> Copy:
        """Start `target.copy_(source)` for each pair; on the CPU inline unless `background`."""
        if self.stream is not None:
            # The copy may read what the compute stream just wrote (KV), or overwrite what it just
            # read (an evicted model): it starts after the work already queued there.
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                for target, source in pairs:
                    target.copy_(source, non_blocking=True)
                event = self.stream.record_event()
            return Copy(event, self.device)
        copy = Copy()
        if not background:
            self._copy_on_cpu(pairs)
            return copy

        def run() -> None:
            try:
                self._copy_on_cpu(pairs)
            except BaseException as error:  # noqa: BLE001 - raised again by Copy.wait in the caller
                copy._error = error

        copy._thread = threading.Thread(target=run, name="aegaeon-copy", daemon=True)
        copy._thread.start()
        return copy

    def _copy_on_cpu(self, pairs: CopyPairs) -> None:
        """`target.copy_(source)` for each pair; memmoves shared among threads where both are the same
        contiguous bytes.

        torch spreads each copy over its thread pool, and on a busy host every copy then waits for
        the pool's threads to be scheduled: a batch of megabyte copies ran several times slower than
        one memcpy of the same bytes. Here the whole batch is one split among `torch.get_num_threads()`
        threads (a memmove releases the GIL).
        """
        ranges: list[Run] = []
        for target, source in pairs:
            plain = target.device.type == source.device.type == "cpu" and target.dtype == source.dtype
            if plain and target.shape == source.shape and target.is_contiguous() and source.is_contiguous():
                ranges.append((target.data_ptr(), source.data_ptr(), target.nbytes))
            else:
                target.copy_(source)
        total = sum(nbytes for _, _, nbytes in ranges)
        if self._helpers is None or total < PARALLEL_COPY_MIN_BYTES:
            memmove_all(ranges)
            return
        first, *rest = split_ranges(ranges, self._threads)
        helping = [self._helpers.submit(memmove_all, share) for share in rest]
        memmove_all(first)
        for done in helping:
            done.result()
