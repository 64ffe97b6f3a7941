"""An instance's turn loop as plain logic: what its device does next, as a stream of commands.

One pass (`TurnLoop.work`) takes in the requests handed to the instance, runs its queued prefills
(prefill and colocated roles: grouped FCFS, switching model only between groups and prefetching the
next group's model) and one decode round (decode and colocated roles: `DecodeInstance.plan_round`
with the prefill queue's waiting work as overhead, resident models free to switch to and measured
turn costs overriding both; each batch's turn under `DecodeTurn`, its KV placed on the device before
and swapped out after when the round has several batches; a colocated instance runs its prefills
between turns). See DESIGN.md, "Token-level scheduling".

The loop is a generator. It yields a command; its driver carries the command out and sends back the
result: the live instance (aegaeon/instance/instance.py) on its engine, the simulator
(aegaeon/sim/policies/aegaeon_instance.py) by advancing its clock by the predicted time. The loop
reads the time through `now` after each command, records the timeline and keeps the turn costs, so
both drivers schedule, and record, exactly alike. A driver advances the generator while holding
whatever guards the scheduler objects (the live node's lock) and runs the commands outside it.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

from aegaeon.scheduler.decode import DecodeInstance, DecodeTurn, RoundPlan
from aegaeon.scheduler.prefill import PrefillQueue
from aegaeon.scheduler.request import SchedRequest
from aegaeon.scheduler.timeline import EventKind, Timeline

# An instance's role: what its device runs.
PREFILL, DECODE, COLOCATED = "prefill", "decode", "colocated"
ROLES = (PREFILL, DECODE, COLOCATED)
# Weight of the newest measurement in the running estimate of a model's turn cost.
TURN_COST_SMOOTHING = 0.2


@dataclass(frozen=True, slots=True)
class Adopt:
    """Take in the requests handed to this instance (and drop aborted ones). Result: whether any came."""


@dataclass(frozen=True, slots=True)
class Claim:
    """Take on a request just popped from the prefill queue. Result: False if it is gone (aborted, or
    shed for waiting too long); the loop then drops it."""

    request: SchedRequest


@dataclass(frozen=True, slots=True)
class Switch:
    """Make `model` the active one. Result: None if it was already; else whether its weights had to
    be copied in (False: they were resident)."""

    model: str


@dataclass(frozen=True, slots=True)
class Prefetch:
    """Start copying `model`'s weights beside the active model. Result: whether it is (or is becoming)
    resident."""

    model: str


@dataclass(frozen=True, slots=True)
class Prefill:
    """Run a claimed request's prefill (the active model is its model): its first token."""

    request: SchedRequest


@dataclass(frozen=True, slots=True)
class HandOff:
    """Place a prefilled request in a decode batch, moving its KV through the host pool if the batch
    is on another instance."""

    request: SchedRequest


@dataclass(frozen=True, slots=True)
class ResidentModels:
    """Result: the models whose weights are on the device now."""


@dataclass(frozen=True, slots=True)
class Place:
    """Make the device's KV of `model` exactly these requests': others swapped out, these swapped in.
    Result: the ids of those swapped in."""

    model: str
    requests: tuple[SchedRequest, ...]


@dataclass(slots=True)  # not frozen: one is made per decode step, and a frozen one costs 3x to make
class Step:
    """One decode step of the placed batch (`requests`: its unfinished members)."""

    model: str
    requests: tuple[SchedRequest, ...]


@dataclass(frozen=True, slots=True)
class SwapOut:
    """Move these requests' KV to the host pool. Result: the seconds it took."""

    model: str
    requests: tuple[SchedRequest, ...]


Command = Adopt | Claim | Switch | Prefetch | Prefill | HandOff | ResidentModels | Place | Step | SwapOut
T = TypeVar("T")
# A run of the loop: yields commands, is sent each one's result, returns a T.
Turns = Generator[Command, Any, T]


class TurnLoop:
    """The scheduling loop of one instance over its prefill queue and decode batches."""

    def __init__(
        self,
        name: str,
        role: str,
        prefill_queue: PrefillQueue | None,
        decode: DecodeInstance | None,
        now: Callable[[], float],
        max_events: int | None = None,
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if (prefill_queue is None) != (role == DECODE) or (decode is None) != (role == PREFILL):
            raise ValueError(f"a {role} instance needs its prefill queue or decode batches, and only those")
        self.role = role
        self.prefill_queue = prefill_queue
        self.decode = decode
        self.now = now
        self.timeline = Timeline(name, max_events=max_events)  # a serving instance keeps its newest events
        # Measured seconds, per model, of bringing a batch onto the device and off it again (switch,
        # KV placement and swap-out): the round's switch cost c, measured rather than predicted.
        self.turn_cost_s: dict[str, float] = {}

    def work(self) -> Turns[bool]:
        """One pass over what the instance may do; False if there was nothing."""
        worked = yield Adopt()
        if self.role != DECODE:
            worked |= yield from self.run_prefills()
        if self.role != PREFILL:
            worked |= yield from self.decode_round()
        return worked

    # -- prefill -------------------------------------------------------------------------------------

    def run_prefills(self) -> Turns[bool]:
        """Run every queued prefill; True if any was taken from the queue."""
        queue = self.prefill_queue
        ran = False
        while True:
            task = queue.pop(self.now())
            next_model = queue.prefetch_model()
            if task is None:
                return ran
            ran = True
            request = task.request
            if not (yield Claim(request)):
                queue.complete()
                continue
            yield from self.switch(request.model)
            if next_model is not None and next_model != request.model:
                yield from self.prefetch(next_model)
            start = self.now()
            yield Prefill(request)
            self.timeline.record(
                EventKind.PREFILL, request.model, start, self.now(), (request.request_id,), tokens=1
            )
            queue.complete()
            if not request.done:
                yield HandOff(request)

    # -- decode --------------------------------------------------------------------------------------

    def decode_round(self) -> Turns[bool]:
        """Plan and run one round over the instance's batches; False if it had none."""
        resident = yield ResidentModels()
        queue = self.prefill_queue
        overhead = queue.waiting_work_s(self.now()) if queue is not None else 0.0
        # Until a model's turn cost is measured, a resident model is taken as free to switch to and
        # any other at the predictor's switch time.
        switch_s = {**{model: 0.0 for model in resident}, **self.turn_cost_s}
        plan = self.decode.plan_round(overhead_s=overhead, switch_s=switch_s)
        if not plan.batches:
            return False
        for index in range(len(plan.batches)):
            yield from self.decode_turn(plan, index)
            if self.role == COLOCATED:
                yield from self.run_prefills()
        return True

    def decode_turn(self, plan: RoundPlan, index: int) -> Turns[None]:
        """Batch `index`'s turn: switch, place its KV, prefetch the next batch's model, step while the
        quota lasts, swap its KV out if others share the round; measure what the turn cost."""
        batch = plan.batches[index]
        members = [r for r in batch.requests if not r.done]
        if not members:
            return
        # A request joins a batch (even one of this round) under the lock that queues its handoff,
        # so every member's KV is handed over by now, if it is not on this instance yet.
        yield Adopt()
        model = batch.model
        entered = self.now()
        yield from self.switch(model)
        # The batch's KV is placed before the next model's prefetch is issued: KV moves go ahead of
        # weights (on a device's copy queue, or its higher-priority KV stream), so this turn's first
        # step never waits behind gigabytes of someone else's weights.
        placing = self.now()
        swapped_in = yield Place(model, tuple(members))
        if swapped_in:
            self.timeline.record(EventKind.SWAP_IN, model, placing, self.now(), swapped_in)
        following = plan.batches[(index + 1) % len(plan.batches)].model
        if following != model:
            yield from self.prefetch(following)
        turn = DecodeTurn.of(plan, index)
        decode, queue = self.decode, self.prefill_queue
        start = now = self.now()
        steps = 0
        while True:
            # New prefills waiting count as a change: an open-ended turn yields to them.
            changed = decode.changed or (queue is not None and len(queue) > 0)
            if not turn.should_continue(now, changed):
                break
            live = [r for r in members if not r.done]
            if not live:
                break
            # The batch's KV must still fit with the lookahead (else the turn ends; the next round's
            # repack splits it).
            if len(live) > 1 and not decode.fits(model, live):
                break
            yield Step(model, tuple(live))
            steps += 1
            now = self.now()
            turn.step_done(now)
        ids = tuple(r.request_id for r in members)
        self.timeline.record(EventKind.DECODE_TURN, model, start, self.now(), ids, tokens=steps)
        cost = start - entered
        if plan.swap_out:
            unfinished = tuple(r for r in members if not r.done)
            if unfinished:
                swap_start = self.now()
                cost += yield SwapOut(model, unfinished)
                self.timeline.record(
                    EventKind.SWAP_OUT, model, swap_start, self.now(), tuple(r.request_id for r in unfinished)
                )
        if len(plan.batches) > 1:
            previous = self.turn_cost_s.get(model, cost)
            self.turn_cost_s[model] = previous + TURN_COST_SMOOTHING * (cost - previous)

    # -- shared --------------------------------------------------------------------------------------

    def switch(self, model: str) -> Turns[None]:
        """Make `model` active, recording the switch if there was one."""
        start = self.now()
        loaded = yield Switch(model)
        if loaded is not None:
            detail = "loaded" if loaded else "resident"
            self.timeline.record(EventKind.SWITCH, model, start, self.now(), detail=detail)

    def prefetch(self, model: str) -> Turns[None]:
        """Start copying `model` in beside the active one, recording when it started."""
        start = self.now()
        if (yield Prefetch(model)):
            self.timeline.record(EventKind.PREFETCH, model, start, start)
