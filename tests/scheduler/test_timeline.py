from __future__ import annotations

import json

import pytest

from aegaeon.scheduler.timeline import EventKind, Timeline


def _interleaved_timeline() -> Timeline:
    t = Timeline("gpu0")
    t.record(EventKind.SWITCH, "a", 0.0, 0.5)
    t.record(EventKind.PREFILL, "a", 0.5, 0.6, request_ids=["a1"], tokens=1)
    t.record(EventKind.DECODE_TURN, "a", 0.6, 1.0, request_ids=["a1"], tokens=10)
    t.record(EventKind.SWAP_OUT, "a", 1.0, 1.1, request_ids=["a1"])
    t.record("switch", "b", 1.0, 1.5)
    t.record("decode_turn", "b", 1.5, 2.0, request_ids=["b1"], tokens=12)
    t.record(EventKind.SWAP_IN, "a", 2.0, 2.1, request_ids=["a1"])
    t.record(EventKind.DECODE_TURN, "a", 2.1, 2.5, request_ids=["a1"], tokens=10, detail="finished a1")
    t.record(EventKind.IDLE, None, 2.5, 3.0)
    return t


def test_interleaving_detected_only_when_a_request_resumes_after_another_model() -> None:
    t = _interleaved_timeline()
    assert t.interleaved("a") and t.interleaved_requests("a") == ["a1"]
    assert not t.interleaved("b")  # b ran once
    # a's second turn serves a new request: a1 finished before the switch, no interleaving.
    u = Timeline("gpu1")
    u.record("decode_turn", "a", 0.0, 1.0, request_ids=["a1"])
    u.record("decode_turn", "b", 1.0, 2.0, request_ids=["b1"])
    u.record("decode_turn", "a", 2.0, 3.0, request_ids=["a2"])
    assert not u.interleaved("a")
    # Consecutive turns of one model are not interleaving either.
    v = Timeline("gpu2")
    v.record("decode_turn", "a", 0.0, 1.0, request_ids=["a1"])
    v.record("decode_turn", "a", 1.0, 2.0, request_ids=["a1"])
    v.record("decode_turn", "b", 2.0, 3.0, request_ids=["b1"])
    assert not v.interleaved("a")


def test_json_round_trip() -> None:
    t = _interleaved_timeline()
    back = Timeline.from_dict(json.loads(json.dumps(t.to_dict())))
    assert back.instance == "gpu0" and back.events == t.events


def test_helpers_and_validation() -> None:
    t = _interleaved_timeline()
    assert t.busy_s("decode_turn") == pytest.approx(0.4 + 0.5 + 0.4)
    assert len(t.of_kind(EventKind.SWITCH, EventKind.IDLE)) == 3
    assert all(e.instance == "gpu0" for e in t.events)
    with pytest.raises(ValueError, match="before it starts"):
        t.record("prefill", "a", 2.0, 1.0)
    with pytest.raises(ValueError):
        t.record("nap", "a", 0.0, 1.0)



def test_a_capped_timeline_holds_its_newest_events_and_counts_every_one() -> None:
    cap = 16
    t = Timeline("gpu0", max_events=cap)
    for i in range(100):
        t.record(EventKind.SWITCH if i % 10 == 0 else EventKind.DECODE_TURN, "a", i, i + 0.5)
    assert len(t) <= cap and t.recorded == 100
    assert t.events[-1].start_s == 99  # the newest are kept
    totals = t.totals()
    assert totals.count[EventKind.SWITCH] == 10 and totals.count[EventKind.DECODE_TURN] == 90
    assert totals.seconds[EventKind.DECODE_TURN] == pytest.approx(45.0)
    assert totals.switches == {("a", ""): 10}
    # A reader by cursor gets what it has not seen yet (the dropped ones are gone).
    events, cursor = t.since(97)
    assert [e.start_s for e in events] == [97, 98, 99] and cursor == 100
    events, cursor = t.since(0)
    assert len(events) == len(t) and cursor == 100
    assert [e.start_s for e in t.recent(since_s=96.0, limit=2)] == [98, 99]
