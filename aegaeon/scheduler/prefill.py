"""Grouped-FCFS prefill: per-model FIFOs, a dispatcher, and each instance's ordered queue of groups.

A group is up to `max_group_size` requests of one model that run back to back, so the instance
switches model only between groups. The size counts every request ever placed in the group, run or
not: a popular model cannot keep its group open forever while other models' groups wait behind it.

Priorities and fairness (equal priorities and a single key change nothing of the above):
- A model of priority w is ranked as if its requests had arrived (1 - 1/w) of its TTFT SLO earlier
  (later, for w < 1). A new group moves ahead of groups of lower-priority models ranked after it, but
  only while each group it passes would still start every request within its TTFT SLO (predicted):
  however the weights are set, no model waits past its TTFT SLO for its turn because of them.
- A model's waiting requests on an instance run in weighted-fair order by API key (fair_queue.py):
  a newcomer takes its place in that order across the model's groups, which keep their sizes and
  places in the queue.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from aegaeon.config import SchedulerConfig
from aegaeon.scheduler.fair_queue import FairQueuing
from aegaeon.scheduler.predictor import Predictor
from aegaeon.scheduler.request import SchedRequest


def prefill_rank(request: SchedRequest, config: SchedulerConfig) -> float:
    """Where `request` stands in prefill order: its arrival, moved earlier by its model's priority
    (by (1 - 1/priority) of its TTFT SLO; later for a priority below 1, unmoved at 1)."""
    priority = config.priority(request.model)
    if priority == 1.0:
        return request.arrival_s
    return request.arrival_s + (1.0 / priority - 1.0) * config.slo(request.model).ttft_s


@dataclass(eq=False)
class PrefillGroup:
    """Requests of one model that run back to back on one instance."""

    model: str
    pending: deque[SchedRequest] = field(default_factory=deque)
    # Requests ever placed in this group (run or waiting): it accepts at most max_group_size.
    placed: int = 0
    # Predicted prefill seconds of the pending requests.
    work_s: float = 0.0
    # The prefill rank (`prefill_rank`) of the request that opened the group.
    rank: float = 0.0


@dataclass(frozen=True)
class PrefillTask:
    """The next request an instance runs, and whether it must switch model first."""

    request: SchedRequest
    switch: bool
    predicted_s: float


class PrefillQueue:
    """One prefill-capable instance's ordered queue of groups (batch size 1, groups in order)."""

    def __init__(
        self, name: str, predictor: Predictor, config: SchedulerConfig, loaded_model: str | None = None
    ) -> None:
        self.name = name
        self.predictor = predictor
        self.config = config
        # The model whose weights the instance holds now (the last one it ran).
        self.loaded_model = loaded_model
        self._groups: deque[PrefillGroup] = deque()
        self._predicted: dict[int, float] = {}  # id(request) -> predicted prefill seconds
        self._fair = FairQueuing()
        self._tags: dict[int, float] = {}  # id(request) -> its fair-queuing finish tag
        self._running: SchedRequest | None = None
        self._running_end_s = 0.0

    @property
    def groups(self) -> tuple[PrefillGroup, ...]:
        return tuple(self._groups)

    @property
    def running(self) -> SchedRequest | None:
        return self._running

    def __len__(self) -> int:
        """Requests waiting (the running one excluded)."""
        return sum(len(g.pending) for g in self._groups)

    def __iter__(self) -> Iterator[SchedRequest]:
        for group in self._groups:
            yield from group.pending

    def joinable_group(self, model: str) -> PrefillGroup | None:
        """The first group of `model` that still takes requests."""
        for group in self._groups:
            if group.model == model and group.placed < self.config.max_group_size:
                return group
        return None

    def join(self, group: PrefillGroup, request: SchedRequest) -> None:
        if group.model != request.model:
            raise ValueError(f"request of {request.model!r} cannot join a group of {group.model!r}")
        if group.placed >= self.config.max_group_size:
            raise ValueError(f"group of {group.model!r} is full ({group.placed} requests)")
        predicted = self.predictor.prefill_s(request.model, [request.prompt_len])
        self._predicted[id(request)] = predicted
        self._tags[id(request)] = self._fair.tag(request, predicted)
        group.pending.append(request)
        group.placed += 1
        group.work_s += predicted
        self._fair_order(request)

    def _fair_order(self, request: SchedRequest) -> None:
        """Move a request just queued to its fair-queuing place among its model's waiting requests.

        The model's requests, across its groups in queue order, are kept sorted by tag; the groups keep
        their sizes, so a request moved ahead pushes the last one before it into the next group.
        """
        groups = [g for g in self._groups if g.model == request.model]
        queued = [r for g in groups for r in g.pending]
        tags = [self._tags[id(r)] for r in queued]
        last = queued.index(request)  # the others are in tag order
        place = bisect.bisect_right(tags, tags[last], 0, last)
        if place == last:
            return  # already in order: one key, or no key (arrival order)
        queued.insert(place, queued.pop(last))
        start = 0
        for group in groups:
            size = len(group.pending)
            group.pending = deque(queued[start : start + size])
            group.work_s = sum(self._predicted[id(r)] for r in group.pending)
            start += size

    def append_group(self, request: SchedRequest, now: float | None = None) -> PrefillGroup:
        """Start a new group with `request` in it: at the tail, or (given `now`) ahead of groups of
        lower-priority models that still start in time behind it."""
        group = PrefillGroup(request.model, rank=prefill_rank(request, self.config))
        position = len(self._groups) if now is None else self._priority_position(group, request, now)
        self._groups.insert(position, group)
        self.join(group, request)
        return group

    def _priority_position(self, group: PrefillGroup, request: SchedRequest, now: float) -> int:
        """Where a new group of `request` goes: ahead of each lower-priority group ranked after it, as
        long as every request it passes still starts within its TTFT SLO."""
        priority = self.config.priority(group.model)
        position = len(self._groups)
        while position > 0:
            before = self._groups[position - 1]
            if priority <= self.config.priority(before.model) or group.rank >= before.rank:
                break
            order = list(self._groups)
            order.insert(position - 1, group)
            if not self._starts_in_time(order, position, request, now):
                break
            position -= 1
        return position

    def _starts_in_time(
        self, order: list[PrefillGroup], first: int, newcomer: SchedRequest, now: float
    ) -> bool:
        """Whether every request waiting in `order[first:]` would start by its TTFT deadline (its
        arrival plus its model's TTFT SLO), with the newcomer queued in `order`'s empty group."""
        predicted = self.predictor.prefill_s(newcomer.model, [newcomer.prompt_len])
        start = max(self._running_end_s, now) if self._running is not None else now
        previous = self.loaded_model
        for index, group in enumerate(order):
            if group.model != previous:
                start += self.predictor.switch_s(group.model)
            previous = group.model
            if not group.pending:  # the newcomer's group
                start += predicted
                continue
            for waiting in group.pending:
                if index >= first and start > waiting.arrival_s + self.config.slo(waiting.model).ttft_s:
                    return False
                start += self._predicted[id(waiting)]
        return True

    def _switch_work_s(self) -> float:
        # A switch per group whose model differs from the one run before it.
        total, previous = 0.0, self.loaded_model
        for group in self._groups:
            if group.model != previous:
                total += self.predictor.switch_s(group.model)
            previous = group.model
        return total

    def waiting_work_s(self, now: float) -> float:
        """Predicted seconds until this instance would start a request appended now."""
        running = max(self._running_end_s - now, 0.0) if self._running is not None else 0.0
        return running + sum(g.work_s for g in self._groups) + self._switch_work_s()

    def peek_model(self) -> str | None:
        """The model the next `pop` runs."""
        return self._groups[0].model if self._groups else None

    def prefetch_model(self) -> str | None:
        """The first queued model other than the loaded one: what to prefetch while this one runs."""
        for group in self._groups:
            if group.model != self.loaded_model:
                return group.model
        return None

    def pop(self, now: float) -> PrefillTask | None:
        """Start the next request at `now` (it becomes the running one); None when nothing waits."""
        if not self._groups:
            self._running = None
            return None
        group = self._groups[0]
        request = group.pending.popleft()
        predicted = self._predicted.pop(id(request))
        self._fair.started(request.model, self._tags.pop(id(request)))
        group.work_s = max(group.work_s - predicted, 0.0) if group.pending else 0.0
        if not group.pending:
            self._groups.popleft()
        switch = request.model != self.loaded_model
        switch_s = self.predictor.switch_s(request.model) if switch else 0.0
        self.loaded_model = request.model
        self._running = request
        self._running_end_s = now + switch_s + predicted
        return PrefillTask(request, switch, predicted)

    def complete(self) -> None:
        """The running request's prefill is over."""
        self._running = None

    def remove(self, request: SchedRequest) -> bool:
        """Drop a waiting request (cancelled); True if it was queued here."""
        for group in self._groups:
            if request in group.pending:
                group.pending.remove(request)
                group.work_s = max(group.work_s - self._predicted.pop(id(request)), 0.0)
                del self._tags[id(request)]
                if not group.pending:
                    self._groups.remove(group)
                return True
        return False


@dataclass(frozen=True)
class PrefillPlacement:
    request: SchedRequest
    instance: int  # index into the dispatcher's instances
    new_group: bool


class PrefillDispatcher:
    """Grouped FCFS over prefill-capable instances: models taken in order of their head's prefill rank
    (its arrival, where priorities are equal)."""

    def __init__(self, instances: Sequence[PrefillQueue], config: SchedulerConfig) -> None:
        if not instances:
            raise ValueError("a prefill dispatcher needs at least one instance")
        self.instances = list(instances)
        self.config = config
        self._fifos: dict[str, deque[SchedRequest]] = {}
        self._seq: dict[int, int] = {}  # id(request) -> submission order, breaks arrival ties
        self._next_seq = 0

    def submit(self, request: SchedRequest) -> None:
        """Queue a new request in its model's FIFO (placed by the next `dispatch`)."""
        self._fifos.setdefault(request.model, deque()).append(request)
        self._seq[id(request)] = self._next_seq
        self._next_seq += 1

    def _next_model(self) -> str | None:
        best, best_key = None, None
        for model, fifo in self._fifos.items():
            if fifo:
                key = (prefill_rank(fifo[0], self.config), self._seq[id(fifo[0])])
                if best_key is None or key < best_key:
                    best, best_key = model, key
        return best

    def place(self, request: SchedRequest, now: float) -> PrefillPlacement:
        """Place one request: join a same-model group with room, else a new group on the least-loaded."""
        joinable = [
            (q.waiting_work_s(now), i, g)
            for i, q in enumerate(self.instances)
            if (g := q.joinable_group(request.model)) is not None
        ]
        if joinable:
            # Several instances have room in a group of this model: the one that starts soonest.
            _, index, group = min(joinable, key=lambda t: (t[0], t[1]))
            self.instances[index].join(group, request)
            return PrefillPlacement(request, index, new_group=False)
        index = min(range(len(self.instances)), key=lambda i: (self.instances[i].waiting_work_s(now), i))
        self.instances[index].append_group(request, now)
        return PrefillPlacement(request, index, new_group=True)

    def dispatch(self, now: float) -> list[PrefillPlacement]:
        """Place every submitted request, always taking the model whose head request arrived first."""
        placements = []
        while (model := self._next_model()) is not None:
            request = self._fifos[model].popleft()
            del self._seq[id(request)]
            placements.append(self.place(request, now))
        return placements
