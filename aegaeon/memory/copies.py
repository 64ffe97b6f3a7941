"""Copies between host and device memory that run beside the computation, each ending in an event.

Scale-ups (a model's byte range in chunks) and KV swaps (a request's blocks, one copy per run of
blocks that are consecutive on both sides: `block_runs`) both go through a `CopyStream`. On CUDA the
copies are issued on a dedicated stream of the engine's device from page-locked host memory and an
event marks their end, so the compute stream keeps working meanwhile and later waits only on what
it reads. Every stream and event call names that device: the current device of the process may be
another one. On the CPU there is no second engine to copy with: a copy runs inline, or on a
background thread when asked, and its thread marks its end; either way its bytes are copied by
copies.c, shared among threads in chunks.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from aegaeon.config import MIB
from aegaeon.native import load_library

CopyPairs = Sequence[tuple[torch.Tensor, torch.Tensor]]  # (target, source)
Run = tuple[int, int, int]  # (target offset, source offset, bytes)
# A CPU copy of fewer bytes runs on the calling thread alone: waking another thread for a share of
# it would cost more than it saves.
PARALLEL_COPY_MIN_BYTES = 4 * MIB
# The piece of a copy a thread takes at a time: small enough that a thread scheduled late, or slowed
# by another process on its core, leaves the others little to wait for; large enough that taking one
# costs nothing next to copying it (~0.1 ms).
COPY_CHUNK_BYTES = 1 * MIB
# A CPU copy of at least this many bytes streams its stores past the caches: its target would not
# stay cached until read anyway, and not reading each target line before writing it saves a third
# of the memory traffic. (Below it, the target may be read soon from the cache, as KV just swapped in.)
STREAM_COPY_MIN_BYTES = 4 * MIB
KERNEL_SOURCE = Path(__file__).with_name("copies.c")
KERNEL_FLAGS = ("-O3", "-march=native", "-fPIC", "-shared")
# The header of a job of copies.c: next chunk, helpers inside, runs, chunk bytes, stream stores.
_JOB_HEADER = 5


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


@functools.cache
def _kernel() -> Callable[[int, int], None] | None:
    """copies.c's `copy_job_run(job, helper)`; None where it cannot be built."""
    library = load_library(KERNEL_SOURCE, KERNEL_FLAGS, "the CPU copy kernel", "CPU copies run on one thread")
    if library is None:
        return None
    library.copy_job_run.argtypes, library.copy_job_run.restype = [ctypes.c_void_p, ctypes.c_int32], None
    return library.copy_job_run


class CopyJob:
    """Byte runs to copy, shared among the threads that `run` it (copies.c takes them chunk by chunk)."""

    def __init__(self, ranges: list[Run]):
        self.nbytes = sum(nbytes for _, _, nbytes in ranges)
        self._job = np.zeros(_JOB_HEADER + 3 * len(ranges), dtype=np.int64)
        self._job[2:_JOB_HEADER] = len(ranges), COPY_CHUNK_BYTES, self.nbytes >= STREAM_COPY_MIN_BYTES
        self._job[_JOB_HEADER:] = np.array(ranges, dtype=np.int64).reshape(-1)

    def run(self, helper: bool) -> None:
        """Copy chunks until none is left; the caller's run (not a `helper`'s) returns once all landed."""
        kernel = _kernel()
        if kernel is not None:
            kernel(self._job.ctypes.data, int(helper))
        elif not helper:
            runs = self._job[_JOB_HEADER:].reshape(-1, 3).tolist()
            for target, source, nbytes in runs:
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
        """`target.copy_(source)` for each pair; one `CopyJob` of all pairs whose two sides are the
        same contiguous bytes, shared among `torch.get_num_threads()` threads.

        torch spreads each copy over its thread pool: a batch of copies is then a fork and join per
        copy, each waiting for the slowest thread, and on a busy host for threads not yet scheduled.
        A job is taken chunk by chunk by whichever threads run: its caller never waits for a helper
        that has not started, and helpers come from a pool of their own (torch's threads keep
        spinning on the cores for milliseconds after each parallel op: a fixed half of the bytes
        handed to a thread sharing a core with them took twice as long as the other half).
        """
        ranges: list[Run] = []
        for target, source in pairs:
            plain = target.device.type == source.device.type == "cpu" and target.dtype == source.dtype
            if plain and target.shape == source.shape and target.is_contiguous() and source.is_contiguous():
                ranges.append((target.data_ptr(), source.data_ptr(), target.nbytes))
            else:
                target.copy_(source)
        if not ranges:
            return
        job = CopyJob(ranges)
        if self._helpers is not None and job.nbytes >= PARALLEL_COPY_MIN_BYTES:
            for _ in range(self._threads - 1):
                # The future is dropped: a helper's run copies or finds nothing left, and the job's
                # own run below waits for every helper that started.
                self._helpers.submit(job.run, True)
        job.run(helper=False)
