"""One simulated aegaeon instance: the live instance loop (aegaeon/instance/instance.py) on a clock.

The loop is the live one, step for step: adopt handoffs; run queued prefills (switching model only
between groups, prefetching the next group's model; a CPU, without a copy engine, waits for the
copy); plan a round with `DecodeInstance.plan_round` (the prefill queue's waiting work as overhead,
resident models free to switch to, measured turn costs overriding both); run each batch's turn under
`DecodeTurn`, swapping its KV in before and out after when the round has several batches; a
colocated instance runs its prefills between turns. Where the live loop calls the engine, this one
advances the clock by the predicted time instead.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aegaeon.scheduler.decode import DecodeInstance, DecodeTurn, RoundPlan
from aegaeon.scheduler.prefill import PrefillQueue
from aegaeon.scheduler.request import SchedRequest
from aegaeon.scheduler.timeline import EventKind, Timeline
from aegaeon.sim.device import ResidentWeights, has_copy_engine
from aegaeon.sim.events import Process

if TYPE_CHECKING:
    from aegaeon.sim.policies.aegaeon import SimNode

PREFILL, DECODE, COLOCATED = "prefill", "decode", "colocated"
# Weight of the newest measurement in the running estimate of a model's turn cost (as the live loop).
TURN_COST_SMOOTHING = 0.2
# Rounds in a row that may pass without the clock moving before the loop is declared stuck.
MAX_IDLE_ROUNDS = 10_000


@dataclass(frozen=True, slots=True)
class Handoff:
    """A prefilled request handed to this instance; its KV is in the node's host pool from `kv_ready_s`."""

    request: SchedRequest
    kv_ready_s: float


class SimInstance:
    """A device's scheduling loop, driven by predicted times."""

    def __init__(
        self,
        name: str,
        role: str,
        node: SimNode,
        prefill_queue: PrefillQueue | None,
        decode: DecodeInstance | None,
        weights: ResidentWeights,
    ) -> None:
        self.name = name
        self.role = role
        self.node = node
        self.loop = node.loop
        self.models = node.models
        self.prefill_queue = prefill_queue
        self.decode = decode
        self.weights = weights
        self.timeline = Timeline(name)
        self.inbox: list[Handoff] = []
        self.active: str | None = None
        # Requests whose KV is on the device now (all of the active model), and when the KV of each
        # adopted request lands in the host pool.
        self.on_device: set[SchedRequest] = set()
        self.kv_ready: dict[SchedRequest, float] = {}
        self.turn_cost_s: dict[str, float] = {}
        # Seconds spent by activity: "prefill", "decode", "switch", "swap", "export".
        self.busy_s: dict[str, float] = defaultdict(float)
        self.copies_overlap = has_copy_engine(self.models.device)
        self._idle_rounds = 0

    # -- the loop ------------------------------------------------------------------------------------

    def run(self) -> Process:
        while True:
            worked = self._adopt_handoffs()
            if self.role == PREFILL:
                worked |= yield from self._run_prefills()
            else:
                if self.role == COLOCATED:
                    worked |= yield from self._run_prefills()
                worked |= yield from self._decode_round()
            if not worked:
                yield self.node.work

    # -- prefill -------------------------------------------------------------------------------------

    def _run_prefills(self) -> Process:
        ran = False
        queue = self.prefill_queue
        while True:
            task = queue.pop(self.loop.now)
            next_model = queue.prefetch_model()
            if task is None:
                return ran
            ran = True
            request = task.request
            yield from self._switch(request.model)
            if next_model is not None and next_model != request.model:
                yield from self._prefetch(next_model)
            start = self.loop.now
            end = start + self.models.predictor.prefill_s(request.model, [request.prompt_len])
            yield end
            request.record_token(end)
            self.busy_s["prefill"] += end - start
            self.timeline.record(
                EventKind.PREFILL, request.model, start, end, (request.request_id,), tokens=1
            )
            queue.complete()
            if request.done:
                continue
            self.on_device.add(request)
            yield from self.node.after_prefill(request, self)

    def export(self, request: SchedRequest) -> float:
        """Hand a prefilled request's KV to the host pool; the seconds the copy takes."""
        self.on_device.discard(request)
        seconds = self.models.kv_move_s(request.model, request.context_len)
        self.busy_s["export"] += seconds
        return seconds

    # -- decode --------------------------------------------------------------------------------------

    def _adopt_handoffs(self) -> bool:
        if not self.inbox:
            return False
        for handoff in self.inbox:
            self.kv_ready[handoff.request] = handoff.kv_ready_s
        self.inbox.clear()
        return True

    def _decode_round(self) -> Process:
        now = self.loop.now
        overhead = self.prefill_queue.waiting_work_s(now) if self.prefill_queue is not None else 0.0
        # A resident model is free to switch to until its turn cost is measured (as the live loop).
        resident = {model: 0.0 for model in self.weights.models()}
        plan = self.decode.plan_round(overhead_s=overhead, switch_s={**resident, **self.turn_cost_s})
        if not plan.batches:
            return False
        self._adopt_handoffs()
        for index in range(len(plan.batches)):
            yield from self._decode_turn(plan, index)
            if self.role == COLOCATED:
                yield from self._run_prefills()
            self._adopt_handoffs()
        if self.loop.now == now:
            self._idle_rounds += 1
            if self._idle_rounds > MAX_IDLE_ROUNDS:
                raise RuntimeError(
                    f"{self.name}: {MAX_IDLE_ROUNDS} rounds passed at {now} s without progress"
                )
        else:
            self._idle_rounds = 0
        return True

    def _decode_turn(self, plan: RoundPlan, index: int) -> Process:
        batch = plan.batches[index]
        members = [r for r in batch.requests if not r.done]
        if not members:
            return
        model = batch.model
        entered = self.loop.now
        yield from self._switch(model)
        following = plan.batches[(index + 1) % len(plan.batches)].model
        if following != model:
            yield from self._prefetch(following)
        yield from self._place_on_device(model, members)
        turn = DecodeTurn.of(plan, index)
        start = self.loop.now
        steps = 0
        decode, queue = self.decode, self.prefill_queue
        decode_s = self.models.predictor.decode_s
        while True:
            now = self.loop.now
            # New prefills waiting count as a change: an open-ended turn yields to them.
            changed = decode.changed or (queue is not None and len(queue) > 0)
            if not turn.should_continue(now, changed):
                break
            live = [r for r in members if not r.done]
            if not live:
                break
            # The batch's KV must still fit with the lookahead (else the turn ends; the next repack
            # splits it).
            if len(live) > 1 and not decode.fits(model, live):
                break
            end = now + decode_s(model, [r.context_len for r in live])
            yield end
            for request in live:
                request.record_token(end)
            steps += 1
            turn.step_done(end)
        end = self.loop.now
        self.busy_s["decode"] += end - start
        self.timeline.record(
            EventKind.DECODE_TURN, model, start, end, tuple(r.request_id for r in members), tokens=steps
        )
        for request in members:
            if request.done:
                self.on_device.discard(request)
        cost = start - entered
        if plan.swap_out:
            unfinished = [r for r in members if not r.done]
            if unfinished:
                seconds = self._swap_out(unfinished)
                swap_start = self.loop.now
                yield swap_start + seconds
                self.timeline.record(
                    EventKind.SWAP_OUT,
                    model,
                    swap_start,
                    self.loop.now,
                    tuple(r.request_id for r in unfinished),
                )
                cost += seconds
        if len(plan.batches) > 1:
            previous = self.turn_cost_s.get(model, cost)
            self.turn_cost_s[model] = previous + TURN_COST_SMOOTHING * (cost - previous)

    def _swap_out(self, requests: list[SchedRequest]) -> float:
        seconds = 0.0
        for request in requests:
            self.on_device.discard(request)
            seconds += self.models.kv_move_s(request.model, request.context_len)
        self.busy_s["swap"] += seconds
        return seconds

    def _place_on_device(self, model: str, members: list[SchedRequest]) -> Process:
        """The device holds exactly the batch's KV of `model`: others swapped out, members swapped in."""
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
            self.on_device.add(request)
            swapped_in.append(request.request_id)
        if not seconds and landed == now:
            return
        self.busy_s["swap"] += seconds
        yield landed + seconds
        if swapped_in:
            self.timeline.record(EventKind.SWAP_IN, model, now, self.loop.now, tuple(swapped_in))

    # -- shared --------------------------------------------------------------------------------------

    def _prefetch(self, model: str) -> Process:
        """Start copying `model` beside the active one. A device without a copy engine (a CPU) copies
        with the cores that compute, so there the copy's time passes before the loop goes on."""
        now = self.loop.now
        if not self.weights.prefetch(model, now, self.active):
            return
        self.timeline.record(EventKind.PREFETCH, model, now, now)
        landed = self.weights.get(model).ready_s
        if self.copies_overlap or landed <= now:
            return
        self.busy_s["switch"] += landed - now
        yield landed

    def _switch(self, model: str) -> Process:
        """Make `model` active: the previous model's KV goes to the host, its weights come in."""
        if self.active == model:
            return
        now = self.loop.now
        drain = self._swap_out(list(self.on_device)) if self.on_device else 0.0
        loads = self.weights.loads
        entry = self.weights.get(model) or self.weights.load(model, now + drain)
        ready = max(now + drain, entry.ready_s)
        self.active = model
        self.weights.touch(model)
        if ready > now:
            yield ready
        self.busy_s["switch"] += ready - now - drain
        loaded = self.weights.loads > loads
        self.timeline.record(EventKind.SWITCH, model, now, ready, detail="loaded" if loaded else "resident")
