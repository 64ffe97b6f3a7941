"""A per-instance timeline: what ran when (switches, prefetches, prefills, decode turns, swaps, idle).

Append-only and cheap to record; JSON-serialisable through to_dict / from_dict. Tests, the simulator
and the dashboard read it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
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


class Timeline:
    """The events of one instance, in the order recorded."""

    def __init__(self, instance: str, events: Iterable[TimelineEvent] = ()) -> None:
        self.instance = instance
        self.events: list[TimelineEvent] = list(events)

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
        self.events.append(event)
        return event

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

