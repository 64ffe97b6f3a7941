"""Copies between host and device memory that run beside the computation, each ending in an event.

Scale-ups (a model's byte range in chunks) and KV swaps (the blocks of the requests moved together,
one copy per run of blocks that are consecutive on both sides: `block_runs`) each go through a
`CopyStream` of their own, the KV one ahead of the weights one. On CUDA the copies are issued on
dedicated streams of the engine's device (the KV stream at a higher priority) from page-locked host
memory and an event marks their end, so the compute stream keeps working meanwhile and later waits
only on what it reads. Every stream and event call names that device: the current device of the
process may be another one. On the CPU there is no second engine to copy with: a copy runs inline
when nothing else is copying, else the device's copier thread runs the copies in issue order, KV
moves before the next chunk of a weights copy, and marks each one's end; either way the bytes are
copied by copies.c, shared among threads in chunks (it releases the GIL), and a KV move's runs go
there as one array of addresses (`ByteRuns`), not a tensor per run.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from aegaeon.config import MIB
from aegaeon.native import load_library

# (target, source) pairs, or on the CPU runs of bytes standing for many pairs.
CopyPairs = Sequence["tuple[torch.Tensor, torch.Tensor] | ByteRuns"]
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
# CUDA stream priority of KV moves (lower is higher; 0 is the default of weight copies), so the
# device schedules them ahead of a prefetch's chunks.
KV_STREAM_PRIORITY = -1


def block_runs(
    targets: Sequence[int] | np.ndarray, sources: Sequence[int] | np.ndarray, block_bytes: int
) -> np.ndarray:
    """Rows of (target offset, source offset, bytes), one per run of blocks consecutive on both sides.

    `targets[i]` and `sources[i]` are the byte offsets of block i of a move; copying the runs copies
    every block, in as few copies as the two layouts allow.
    """
    targets = np.asarray(targets, dtype=np.int64)
    sources = np.asarray(sources, dtype=np.int64)
    if targets.shape != sources.shape:
        raise ValueError(f"{len(targets)} target blocks for {len(sources)} source blocks")
    if not len(targets):
        return np.empty((0, 3), dtype=np.int64)
    # A run starts at the first block and wherever either side does not follow on from the block before.
    starts = np.flatnonzero(
        np.concatenate(([True], (np.diff(targets) != block_bytes) | (np.diff(sources) != block_bytes)))
    )
    blocks = np.diff(starts, append=len(targets))
    return np.stack([targets[starts], sources[starts], blocks * block_bytes], axis=1)


@dataclass(frozen=True, eq=False)
class ByteRuns:
    """Runs of bytes from one contiguous CPU byte tensor into another (a KV move on the CPU): `runs`
    has rows of (target offset, source offset, bytes). Copied like the pairs it stands for, without
    a tensor per run."""

    target: torch.Tensor
    source: torch.Tensor
    runs: np.ndarray

    def ranges(self) -> np.ndarray:
        """The runs as (target address, source address, bytes)."""
        return self.runs + np.array([self.target.data_ptr(), self.source.data_ptr(), 0], dtype=np.int64)


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

    def __init__(self, ranges: np.ndarray):
        """`ranges`: rows of (target address, source address, bytes)."""
        ranges = np.asarray(ranges, dtype=np.int64).reshape(-1, 3)
        self.nbytes = int(ranges[:, 2].sum())
        self._job = np.zeros(_JOB_HEADER + ranges.size, dtype=np.int64)
        self._job[2:_JOB_HEADER] = len(ranges), COPY_CHUNK_BYTES, self.nbytes >= STREAM_COPY_MIN_BYTES
        self._job[_JOB_HEADER:] = ranges.reshape(-1)

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
        # On the CPU, set by the copier thread once a queued copy has run (None: it ran inline).
        self._finished: threading.Event | None = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        if self._event is not None:
            return self._event.query()
        return self._finished is None or self._finished.is_set()

    def wait(self) -> None:
        """Return when the compute stream may read the copied bytes (on CUDA, without stalling the host)."""
        if self._event is not None:
            torch.cuda.current_stream(self._device).wait_event(self._event)
        if self._finished is not None:
            self._finished.wait()
        if self._error is not None:
            raise self._error

    def synchronize(self) -> None:
        """Return when the copy has finished, host included (before its source may be reused)."""
        if self._event is not None:
            self._event.synchronize()
        self.wait()


@dataclass(eq=False)
class _QueuedCopy:
    """A copy waiting for (or being run by) a CPU copier: its pairs and how many of them have run."""

    stream: CopyStream
    pairs: list[tuple[torch.Tensor, torch.Tensor] | ByteRuns]
    copy: Copy
    ran: int = 0


class _CPUCopier:
    """The thread that runs the queued copies of one CPU device, one at a time in issue order, except
    that copies of the front queue (KV moves) go before the next pair (chunk) of a back one (weights).

    A CPU has no copy engine: its cores copy. One thread copying in a chosen order keeps a swap-in
    issued during a model's prefetch from waiting behind the whole prefetch: it waits at most for
    the chunk being copied.
    """

    def __init__(self) -> None:
        self._ready = threading.Condition()
        self._front: deque[_QueuedCopy] = deque()
        self._back: deque[_QueuedCopy] = deque()
        self._running = False
        self._thread: threading.Thread | None = None

    @property
    def idle(self) -> bool:
        with self._ready:
            return not (self._running or self._front or self._back)

    def submit(self, job: _QueuedCopy, front: bool) -> None:
        job.copy._finished = threading.Event()
        with self._ready:
            (self._front if front else self._back).append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="aegaeon-copier", daemon=True)
                self._thread.start()
            self._ready.notify()

    def _run(self) -> None:
        while True:
            with self._ready:
                while not (self._front or self._back):
                    self._ready.wait()
                if self._front:  # a KV move runs whole
                    job, whole = self._front.popleft(), True
                else:  # weights go one chunk at a time, so a KV move can cut in
                    job, whole = self._back[0], False
                self._running = True
            pairs = job.pairs[job.ran :] if whole else job.pairs[job.ran : job.ran + 1]
            try:
                job.stream._copy_on_cpu(pairs)
            except BaseException as error:  # noqa: BLE001 - raised again by Copy.wait in the caller
                job.copy._error = error
                pairs = job.pairs[job.ran :]  # the rest is not copied
            job.ran += len(pairs)
            finished = job.ran == len(job.pairs)
            with self._ready:
                if finished and not whole:
                    self._back.popleft()
                self._running = False
            if finished:
                job.copy._finished.set()


class CopyStream:
    """Issues copies off the compute path of one device.

    A device's KV moves go on their own stream, made `ahead_of` its weights stream: on CUDA a second
    stream of higher priority, on the CPU the front queue of the copier thread the two share. So a
    swap-in issued while the next model's weights are being prefetched does not wait for them.
    """

    def __init__(self, device: torch.device, ahead_of: CopyStream | None = None):
        self.device = device
        self._front = ahead_of is not None
        self.stream: torch.cuda.Stream | None = None
        self._copier: _CPUCopier | None = None
        if device.type == "cuda":
            self.stream = torch.cuda.Stream(device, priority=KV_STREAM_PRIORITY if self._front else 0)
        else:
            self._copier = ahead_of._copier if self._front else _CPUCopier()
        self._threads = torch.get_num_threads() if self.stream is None else 1
        self._helpers = (
            ThreadPoolExecutor(self._threads - 1, thread_name_prefix="aegaeon-copy")
            if self._threads > 1
            else None
        )

    def copy(self, pairs: CopyPairs, background: bool = False) -> Copy:
        """Start `target.copy_(source)` for each pair.

        On the CPU a copy issued while the copier is idle and not `background` runs inline; otherwise
        it is queued (in order, KV moves ahead of weights) and, unless `background`, waited for.
        """
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
        if not background and self._copier.idle:
            # Only the engine's thread issues copies: nothing can be queued while this one runs.
            self._copy_on_cpu(pairs)
            return copy
        self._copier.submit(_QueuedCopy(self, list(pairs), copy), self._front)
        if not background:
            copy.wait()
        return copy

    def copy_runs(self, target: torch.Tensor, source: torch.Tensor, runs: np.ndarray) -> Copy:
        """Start copying runs of bytes between two contiguous byte tensors (rows of `runs`: target
        offset, source offset, bytes), as `copy` of the pairs of slices they name."""
        if self.stream is not None:
            return self.copy([(target[t : t + n], source[s : s + n]) for t, s, n in runs.tolist()])
        return self.copy([ByteRuns(target, source, runs)])

    def _copy_on_cpu(self, pairs: CopyPairs) -> None:
        """`target.copy_(source)` for each pair; one `CopyJob` of all byte runs and all pairs whose
        two sides are the same contiguous bytes, shared among `torch.get_num_threads()` threads.

        torch spreads each copy over its thread pool: a batch of copies is then a fork and join per
        copy, each waiting for the slowest thread, and on a busy host for threads not yet scheduled.
        A job is taken chunk by chunk by whichever threads run: its caller never waits for a helper
        that has not started, and helpers come from a pool of their own (torch's threads keep
        spinning on the cores for milliseconds after each parallel op: a fixed half of the bytes
        handed to a thread sharing a core with them took twice as long as the other half).
        """
        ranges: list[np.ndarray] = []
        plain_pairs: list[tuple[int, int, int]] = []
        for pair in pairs:
            if isinstance(pair, ByteRuns):
                ranges.append(pair.ranges())
                continue
            target, source = pair
            plain = target.device.type == source.device.type == "cpu" and target.dtype == source.dtype
            if plain and target.shape == source.shape and target.is_contiguous() and source.is_contiguous():
                plain_pairs.append((target.data_ptr(), source.data_ptr(), target.nbytes))
            else:
                target.copy_(source)
        if plain_pairs:
            ranges.append(np.array(plain_pairs, dtype=np.int64))
        if not ranges:
            return
        job = CopyJob(np.concatenate(ranges) if len(ranges) > 1 else ranges[0])
        if self._helpers is not None and job.nbytes >= PARALLEL_COPY_MIN_BYTES:
            for _ in range(self._threads - 1):
                # The future is dropped: a helper's run copies or finds nothing left, and the job's
                # own run below waits for every helper that started.
                self._helpers.submit(job.run, True)
        job.run(helper=False)
