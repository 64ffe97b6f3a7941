from __future__ import annotations

import pytest

from aegaeon.sim.events import EventLoop, Signal


def test_processes_resume_in_time_order_and_ties_in_scheduling_order() -> None:
    loop = EventLoop()
    seen = []

    def proc(name: str, times: list[float]):
        for t in times:
            yield t
            seen.append((loop.now, name))

    loop.spawn(proc("a", [1.0, 3.0]))
    loop.spawn(proc("b", [1.0, 2.0]))
    loop.call_at(2.5, lambda: seen.append((loop.now, "callback")))
    assert loop.run() == 3.0
    assert seen == [(1.0, "a"), (1.0, "b"), (2.0, "b"), (2.5, "callback"), (3.0, "a")]


def test_signal_parks_until_notified() -> None:
    loop = EventLoop()
    signal = Signal(loop)
    woke = []

    def waiter():
        yield signal
        woke.append(loop.now)

    loop.spawn(waiter())
    loop.call_at(5.0, signal.notify_all)
    loop.run()
    assert woke == [5.0]


def test_run_stops_at_until_and_can_resume() -> None:
    loop = EventLoop()
    loop.call_at(10.0, lambda: None)
    assert loop.run(until=4.0) == 4.0
    assert loop.pending() == 1
    assert loop.run() == 10.0


def test_a_process_cannot_go_back_in_time() -> None:
    loop = EventLoop()

    def bad():
        yield 2.0
        yield 1.0

    loop.spawn(bad())
    with pytest.raises(RuntimeError, match="before the clock"):
        loop.run()
    with pytest.raises(ValueError, match="already at"):
        loop.call_at(0.5, lambda: None)
