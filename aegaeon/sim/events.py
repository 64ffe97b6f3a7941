"""Discrete-event core: one clock, a heap of timed resumptions, and signals that processes wait on.

A *process* is a generator. It yields either an absolute time (a float: resume me then) or a
`Signal` (park me until someone notifies it). Plain callbacks can be scheduled too (arrivals). Ties
in time resolve in scheduling order, so a run is deterministic.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Generator
from typing import Union

Process = Generator[Union[float, "Signal"], None, None]

_PROCESS, _CALLBACK = 0, 1


class Signal:
    """A condition processes wait on; `notify_all` resumes every waiter at the current time."""

    def __init__(self, loop: EventLoop) -> None:
        self._loop = loop
        self._waiters: list[Process] = []

    def notify_all(self) -> None:
        waiters, self._waiters = self._waiters, []
        for process in waiters:
            self._loop.resume_at(self._loop.now, process)

    def __len__(self) -> int:
        return len(self._waiters)


class EventLoop:
    """The simulation clock and its event heap."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, int, object]] = []
        self._seq = itertools.count()
        self.events_run = 0

    def spawn(self, process: Process, at: float | None = None) -> None:
        """Start a process at `at` (default: now)."""
        self.resume_at(self.now if at is None else at, process)

    def resume_at(self, time_s: float, process: Process) -> None:
        heapq.heappush(self._heap, (time_s, next(self._seq), _PROCESS, process))

    def call_at(self, time_s: float, callback: Callable[[], None]) -> None:
        """Run `callback()` at `time_s`."""
        if time_s < self.now:
            raise ValueError(f"cannot schedule at {time_s} s, the clock is already at {self.now} s")
        heapq.heappush(self._heap, (time_s, next(self._seq), _CALLBACK, callback))

    def pending(self) -> int:
        return len(self._heap)

    def run(self, until: float = math.inf) -> float:
        """Run events in time order until none is left or the next is past `until`; the final time."""
        heap, heappop, heappush = self._heap, heapq.heappop, heapq.heappush
        seq = self._seq
        while heap:
            time_s, _, kind, target = heap[0]
            if time_s > until:
                self.now = until
                return until
            heappop(heap)
            self.now = time_s
            self.events_run += 1
            if kind == _CALLBACK:
                target()
                continue
            try:
                item = next(target)
            except StopIteration:
                continue
            if isinstance(item, Signal):
                item._waiters.append(target)
            elif item >= time_s:
                heappush(heap, (item, next(seq), _PROCESS, target))
            else:
                raise RuntimeError(f"a process asked to resume at {item} s, before the clock ({time_s} s)")
        return self.now
