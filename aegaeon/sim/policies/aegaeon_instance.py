"""One simulated aegaeon instance: the turn loop (aegaeon/scheduler/turn_loop.py) driven on a clock.

The live instance carries each command of the loop out on its engine; this one advances the clock
by the predicted time instead: a prefill or decode step by the predictor's time, a switch until the
weights' copy lands (the previous model's KV going to the host first), a KV move by the link's time.
A prefetch copies beside the computation on a GPU; a CPU, without a copy engine, waits for the copy.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aegaeon.scheduler.decode import DecodeInstance
from aegaeon.scheduler.prefill import PrefillQueue
from aegaeon.scheduler.request import SchedRequest
from aegaeon.scheduler.timeline import EventKind
from aegaeon.scheduler.turn_loop import (
    Adopt,
    Claim,
    Command,
    HandOff,
    Place,
    Prefetch,
    Prefill,
    ResidentModels,
    Step,
    SwapOut,
    Switch,
    TurnLoop,
)
from aegaeon.sim.breakdown import DECODE, KV, PREFILL, PREFILL_SWITCH, SWITCH, LatencyBreakdown
from aegaeon.sim.device import ResidentWeights, has_copy_engine
from aegaeon.sim.events import Process

if TYPE_CHECKING:
    from aegaeon.sim.policies.aegaeon import SimNode

# Passes in a row that may work without the clock moving before the loop is declared stuck.
MAX_IDLE_PASSES = 10_000


@dataclass(frozen=True, slots=True)
class Handoff:
    """A prefilled request handed to this instance; its KV is in the node's host pool from `kv_ready_s`."""

    request: SchedRequest
    kv_ready_s: float


class SimInstance:
    """A device's turn loop, driven by predicted times."""

    def __init__(
        self,
        name: str,
        role: str,
        node: SimNode,
        prefill_queue: PrefillQueue | None,
        decode: DecodeInstance | None,
        weights: ResidentWeights,
        breakdown: LatencyBreakdown | None = None,
    ) -> None:
        self.name = name
        self.node = node
        self.loop = node.loop
        self.models = node.models
        self.turns = TurnLoop(name, role, prefill_queue, decode, lambda: self.loop.now)
        self.timeline = self.turns.timeline
        self.weights = weights
        self.inbox: list[Handoff] = []
        self.active: str | None = None
        # Requests whose KV is on the device now (all of the active model), in the order placed (a
        # dict, not a set of identity-hashed requests: a drain then sums its KV moves in the same
        # order in every run), and when the KV of each adopted request lands in the host pool.
        self.on_device: dict[SchedRequest, None] = {}
        self.kv_ready: dict[SchedRequest, float] = {}
        # Seconds spent moving weights and KV: "switch", "swap", "export" (computing: see `busy_s`).
        self._moving_s: dict[str, float] = defaultdict(float)
        self.copies_overlap = has_copy_engine(self.models.device)
        self.breakdown = breakdown if breakdown is not None else LatencyBreakdown()
        # The last switch that waited for a copy: (model, start, seconds); charged to the requests of
        # the prefill group or decode turn it was for.
        self._last_switch: tuple[str, float, float] | None = None

    @property
    def prefill_queue(self) -> PrefillQueue | None:
        return self.turns.prefill_queue

    @property
    def decode(self) -> DecodeInstance | None:
        return self.turns.decode

    @property
    def busy_s(self) -> dict[str, float]:
        """Seconds spent by activity: "prefill", "decode" (the timeline's compute events), "switch",
        "swap", "export"."""
        busy = dict(self._moving_s)
        for activity, kind in (("prefill", EventKind.PREFILL), ("decode", EventKind.DECODE_TURN)):
            events = self.timeline.of_kind(kind)
            if events:
                busy[activity] = sum(e.duration_s for e in events)
        return busy

    # -- the loop ------------------------------------------------------------------------------------

    def run(self) -> Process:
        """Pass after pass of the turn loop, each command carried out on the clock; between passes
        that found nothing to do, wait for work."""
        idle_passes = 0
        loop, on_device, decode_s = self.loop, self.on_device, self.models.predictor.decode_s
        charge_all = self.breakdown.charge_all
        while True:
            start = loop.now
            turns = self.turns.work()
            result = None
            while True:
                try:
                    command = turns.send(result)
                except StopIteration as done:
                    worked = done.value
                    break
                if type(command) is Step:
                    # Here rather than in `_execute`: a run is mostly decode steps.
                    requests = command.requests
                    end = loop.now + decode_s(command.model, [r.context_len for r in requests])
                    charge_all(requests, DECODE, end - loop.now)
                    yield end
                    for request in requests:
                        request.record_token(end)
                        if request.done:
                            on_device.pop(request, None)
                    result = None
                else:
                    result = yield from self._execute(command)
            if not worked:
                yield self.node.work
            elif loop.now == start:
                idle_passes += 1
                if idle_passes > MAX_IDLE_PASSES:
                    raise RuntimeError(f"{self.name}: {MAX_IDLE_PASSES} passes at {start} s without progress")
            else:
                idle_passes = 0

    def _execute(self, command: Command) -> Process:
        """Carry out one command (a decode step is carried out in `run`); its result."""
        match command:
            case Adopt():
                return self._adopt_handoffs()
            case Switch(model=model):
                start = self.loop.now
                result = yield from self._switch(model)
                self._last_switch = (model, start, self.loop.now - start) if self.loop.now > start else None
                return result
            case Prefetch(model=model):
                return (yield from self._prefetch(model))
            case Place(model=model, requests=requests):
                start = self.loop.now
                result = yield from self._place_on_device(model, requests)
                self.breakdown.charge_all(requests, KV, self.loop.now - start)
                if self._last_switch is not None and self._last_switch[0] == model:
                    self.breakdown.charge_all(requests, SWITCH, self._last_switch[2])
                self._last_switch = None
                return result
            case SwapOut(requests=requests):
                seconds = self._swap_out(requests)
                yield self.loop.now + seconds
                return seconds
            case ResidentModels():
                return self.weights.models()
            case Claim():
                return True
            case Prefill(request=request):
                end = self.loop.now + self.models.predictor.prefill_s(request.model, [request.prompt_len])
                self.breakdown.charge(request, PREFILL, end - self.loop.now)
                if self._last_switch is not None:
                    model, start, seconds = self._last_switch
                    if model == request.model and request.arrival_s <= start:
                        self.breakdown.charge(request, PREFILL_SWITCH, seconds)
                yield end
                request.record_token(end)
                return None
            case HandOff(request=request):
                self.on_device[request] = None
                yield from self.node.after_prefill(request, self)
                return None
        raise TypeError(f"unknown command {command!r}")

    def export(self, request: SchedRequest) -> float:
        """Hand a prefilled request's KV to the host pool; the seconds the copy takes."""
        self.on_device.pop(request, None)
        seconds = self.models.kv_move_s(request.model, request.context_len)
        self._moving_s["export"] += seconds
        self.breakdown.charge(request, KV, seconds)
        return seconds

    def _adopt_handoffs(self) -> bool:
        if not self.inbox:
            return False
        for handoff in self.inbox:
            self.kv_ready[handoff.request] = handoff.kv_ready_s
        self.inbox.clear()
        return True

    def _swap_out(self, requests) -> float:
        seconds = 0.0
        for request in requests:
            self.on_device.pop(request, None)
            move_s = self.models.kv_move_s(request.model, request.context_len)
            self.breakdown.charge(request, KV, move_s)
            seconds += move_s
        self._moving_s["swap"] += seconds
        return seconds

    def _place_on_device(self, model: str, members: tuple[SchedRequest, ...]) -> Process:
        """The device holds exactly the batch's KV of `model`: others swapped out, members swapped in
        once their KV has landed in the host pool. The ids swapped in (none if it took no time)."""
        now = self.loop.now
        wanted = set(members)
        out = [r for r in self.on_device if r.model == model and r not in wanted]
        seconds = self._swap_out(out) if out else 0.0
        landed = now
        swapped_in = []
        for request in members:
            if request in self.on_device:
                continue
            landed = max(landed, self.kv_ready.pop(request, now))
            seconds += self.models.kv_move_s(model, request.context_len)
            self.on_device[request] = None
            swapped_in.append(request.request_id)
        if not seconds and landed == now:
            return []
        self._moving_s["swap"] += seconds
        yield landed + seconds
        return swapped_in

    def _prefetch(self, model: str) -> Process:
        """Start copying `model` beside the active one. A device without a copy engine (a CPU) copies
        with the cores that compute, so there the copy's time passes before the loop goes on."""
        now = self.loop.now
        if not self.weights.prefetch(model, now, self.active):
            return False
        landed = self.weights.get(model).ready_s
        if self.copies_overlap or landed <= now:
            return True
        self._moving_s["switch"] += landed - now
        yield landed
        return True

    def _switch(self, model: str) -> Process:
        """Make `model` active: the previous model's KV goes to the host, its weights come in."""
        if self.active == model:
            return None
        now = self.loop.now
        drain = self._swap_out(list(self.on_device)) if self.on_device else 0.0
        loads = self.weights.loads
        entry = self.weights.get(model) or self.weights.load(model, now + drain)
        ready = max(now + drain, entry.ready_s)
        self.active = model
        self.weights.touch(model)
        if ready > now:
            yield ready
        self._moving_s["switch"] += ready - now - drain
        return self.weights.loads > loads
