"""A per-instance timeline: what ran when (switches, prefetches, prefills, decode turns, swaps, idle).

Append-only and cheap to record; JSON-serialisable through to_dict / from_dict. Tests, the simulator
and the dashboard read it. A serving instance's timeline holds only its newest `max_events` events (a
long-running node must not grow without end); its running totals (`totals()`) still count every event,
and readers on other threads take events by cursor (`since`) or by time (`recent`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum


class EventKind(str, Enum):
    SWITCH = "switch"
    PREFETCH = "prefetch"
    PREFILL = "prefill"
    DECODE_TURN = "decode_turn"
    SWAP_OUT = "swap_out"
    SWAP_IN = "swap_in"
    IDLE = "idle"
    RESTART = "restart"  # the instance's process died and was started again


# The kinds in which a model computes tokens for its requests.
COMPUTE_KINDS = frozenset({EventKind.PREFILL, EventKind.DECODE_TURN})


@dataclass(frozen=True, slots=True)
class TimelineEvent:
    kind: EventKind
    model: str | None  # None for idle
    start_s: float
    end_s: float
    instance: str
    request_ids: tuple[str, ...] = ()
    tokens: int = 0
    detail: str = ""

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    def to_dict(self) -> dict:
        return {
            "kind": self.kind.value,
            "model": self.model,
            "start_s": self.start_s,
            "end_s": self.end_s,
            "instance": self.instance,
            "request_ids": list(self.request_ids),
            "tokens": self.tokens,
            "detail": self.detail,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> TimelineEvent:
        return cls(
            kind=EventKind(d["kind"]),
            model=d.get("model"),
            start_s=float(d["start_s"]),
            end_s=float(d["end_s"]),
            instance=str(d["instance"]),
            request_ids=tuple(d.get("request_ids", ())),
            tokens=int(d.get("tokens", 0)),
            detail=str(d.get("detail", "")),
        )


@dataclass
class TimelineTotals:
    """Counts and seconds over every event a timeline recorded, dropped ones included."""

    count: dict[EventKind, int] = field(default_factory=dict)
    seconds: dict[EventKind, float] = field(default_factory=dict)
    switches: dict[tuple[str, str], int] = field(default_factory=dict)  # (model, detail) -> count

    def add(self, event: TimelineEvent) -> None:
        self.count[event.kind] = self.count.get(event.kind, 0) + 1
        self.seconds[event.kind] = self.seconds.get(event.kind, 0.0) + event.duration_s
        if event.kind is EventKind.SWITCH:
            key = (event.model or "", event.detail)
            self.switches[key] = self.switches.get(key, 0) + 1

    def copy(self) -> TimelineTotals:
        return TimelineTotals(dict(self.count), dict(self.seconds), dict(self.switches))


class Timeline:
    """The events of one instance, in the order recorded (the newest `max_events` of them, if set).

    One thread records; others read through `since`, `recent` and `totals`, which take the timeline's
    lock. `events` is replaced, never shrunk in place, so a reader holding the old list is unharmed.
    """

    def __init__(
        self, instance: str, events: Iterable[TimelineEvent] = (), max_events: int | None = None
    ) -> None:
        if max_events is not None and max_events < 1:
            raise ValueError(f"max_events must be >= 1, got {max_events}")
        self.instance = instance
        self.max_events = max_events
        self.events: list[TimelineEvent] = list(events)
        self._totals = TimelineTotals()
        for event in self.events:
            self._totals.add(event)
        self.recorded = len(self.events)  # events ever recorded; the held ones are the newest
        self._lock = threading.Lock()
        self._trim()

    def __len__(self) -> int:
        return len(self.events)

    def record(
        self,
        kind: EventKind | str,
        model: str | None,
        start_s: float,
        end_s: float,
        request_ids: Sequence[str] = (),
        tokens: int = 0,
        detail: str = "",
    ) -> TimelineEvent:
        """Append one event and return it."""
        if end_s < start_s:
            raise ValueError(f"event ends ({end_s}) before it starts ({start_s})")
        event = TimelineEvent(
            EventKind(kind), model, start_s, end_s, self.instance, tuple(request_ids), tokens, detail
        )
        with self._lock:
            self.events.append(event)
            self.recorded += 1
            self._totals.add(event)
            self._trim()
        return event

    def _trim(self) -> None:
        """Drop the oldest events past `max_events`, an eighth of the cap at a time (amortised O(1))."""
        if self.max_events is not None and len(self.events) > self.max_events:
            self.events = self.events[len(self.events) - self.max_events + self.max_events // 8 :]

    def since(self, cursor: int) -> tuple[list[TimelineEvent], int]:
        """The held events recorded after the first `cursor` ones, and the cursor to pass next time."""
        with self._lock:
            first = self.recorded - len(self.events)  # the sequence number of events[0]
            return self.events[max(cursor - first, 0) :], self.recorded

    def recent(self, since_s: float, limit: int) -> list[TimelineEvent]:
        """The newest held events that ended at or after `since_s`, at most `limit`, oldest first."""
        with self._lock:
            events = self.events
            start = len(events)
            # Events are appended as they end: walk back from the tail until they get too old.
            while start > 0 and len(events) - start < limit and events[start - 1].end_s >= since_s:
                start -= 1
            return events[start:]

    def totals(self) -> TimelineTotals:
        """Counts and seconds by kind, and switches by (model, detail), over every event recorded."""
        with self._lock:
            return self._totals.copy()

    def of_kind(self, *kinds: EventKind | str) -> list[TimelineEvent]:
        wanted = {EventKind(k) for k in kinds}
        return [e for e in self.events if e.kind in wanted]

    def busy_s(self, kind: EventKind | str) -> float:
        """Total seconds spent in events of `kind`."""
        return sum(e.duration_s for e in self.of_kind(kind))

    def interleaved_requests(self, model: str) -> list[str]:
        """Requests of `model` that computed, then another model computed, then they computed again:
        the model was switched out while these were unfinished and later resumed."""
        last_seen: dict[str, int] = {}  # request id -> index of its latest compute event
        other_since: list[int] = []  # indices of compute events of other models
        found: dict[str, None] = {}
        compute = [e for e in self.events if e.kind in COMPUTE_KINDS]
        for index, event in enumerate(compute):
            if event.model != model:
                other_since.append(index)
                continue
            for rid in event.request_ids:
                previous = last_seen.get(rid)
                # Another model ran between this request's previous compute event and this one.
                if previous is not None and other_since and other_since[-1] > previous:
                    found[rid] = None
                last_seen[rid] = index
        return list(found)

    def interleaved(self, model: str) -> bool:
        """Whether `model` was switched out with unfinished requests and later resumed them."""
        return bool(self.interleaved_requests(model))

    def to_dict(self) -> dict:
        return {"instance": self.instance, "events": [e.to_dict() for e in self.events]}

    @classmethod
    def from_dict(cls, d: Mapping) -> Timeline:
        return cls(str(d["instance"]), (TimelineEvent.from_dict(e) for e in d["events"]))

