"""One instance: a device's long-lived loop running the token-level schedule on a real engine.

Roles (DESIGN.md, "Token-level scheduling"):
- prefill: runs its queue of groups one request at a time (grouped FCFS), switching model only
  between groups and prefetching the next group's model; hands each prefilled request (KV in the
  node's host pool) to the decode instance the decode dispatcher picks.
- decode: runs rounds of weighted round-robin over its per-model batches; each batch gets a turn of
  its quota, its KV swapped in before and out after when the round has more than one batch.
- colocated: both on one device; the queued prefills run between decode turns and their predicted
  time counts in the round (`overhead_s`).

The loop runs in the node's process, as a thread; the engine runs in the instance's own process
(`RemoteEngine`: each engine operation is one call to it). The scheduler objects (`PrefillQueue`,
`DecodeInstance`) are shared with the node's dispatchers and are only touched under the node's lock;
the engine is only called by this instance's thread.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aegaeon.engine.engine import RequestHandoff
from aegaeon.engine.outputs import RequestOutput
from aegaeon.instance.remote import InstanceDied, RemoteEngine
from aegaeon.scheduler.decode import DecodeInstance, DecodeTurn, RoundPlan
from aegaeon.scheduler.prefill import PrefillQueue
from aegaeon.scheduler.request import SchedRequest
from aegaeon.scheduler.timeline import EventKind, Timeline

if TYPE_CHECKING:
    from aegaeon.instance.node import Node

PREFILL, DECODE, COLOCATED = "prefill", "decode", "colocated"
# A request's states as the node reports them (`Node.request_moved`), named as request records name them.
PREFILLING, DECODING = "prefilling", "decoding"


@dataclass(frozen=True)
class Abort:
    """Drop a request from this instance's engine, wherever it stands there."""

    request_id: str


# Weight of the newest measurement in the running estimate of a model's turn cost.
TURN_COST_SMOOTHING = 0.2


class Instance(threading.Thread):
    """A device's scheduling loop over its own engine."""

    # Whether the node restarts this instance's process when it dies and resumes its requests.
    recoverable = True

    def __init__(
        self,
        name: str,
        role: str,
        engine: RemoteEngine,
        node: Node,
        prefill_queue: PrefillQueue | None,
        decode: DecodeInstance | None,
    ):
        super().__init__(name=f"aegaeon-{name}", daemon=True)
        self.instance_name = name
        self.role = role
        self.engine = engine
        self.node = node
        self.prefill_queue = prefill_queue
        self.decode = decode
        self.timeline = Timeline(name, max_events=node.config.timeline_events)
        # Requests handed over by prefill instances, and aborts: applied to the engine by this thread.
        self.inbox: queue.SimpleQueue[RequestHandoff | Abort] = queue.SimpleQueue()
        self.error: BaseException | None = None
        # Seconds spent inside engine.step() during decode turns, and in the whole turn loops:
        # their difference is the scheduler's own overhead.
        self.decode_step_s = 0.0
        self.decode_loop_s = 0.0
        # Measured seconds, per model, of bringing a batch onto the device and off it again
        # (switch, KV swap-in and swap-out): the round's switch cost c, measured rather than guessed.
        self.turn_cost_s: dict[str, float] = {}
        # Models whose weights were in the arena at the last look (the node's heartbeat reports them).
        self.resident: list[str] = []
        # The request whose prefill runs now (popped from the prefill queue, not yet handed on).
        self.prefilling: SchedRequest | None = None
        # When the instance process was restarted after dying (the node gives up after a few).
        self.restarts: list[float] = []

    # -- the loop ------------------------------------------------------------------------------------

    def run(self) -> None:
        while not self.node.stopping:
            try:
                try:
                    if not self._work():
                        self.node.wait_for_work()
                except InstanceDied as death:
                    # The process is restarted and the requests it held resume; the loop goes on.
                    if not self.node.restart_instance(self, death):
                        return
            except BaseException as error:  # noqa: BLE001 - reported to every request of the node
                self.error = error
                self.node.instance_failed(self, error)
                return

    def _work(self) -> bool:
        """One pass over what this instance may do; False if there was nothing."""
        worked = self._adopt_handoffs()
        if self.role == PREFILL:
            worked |= self._run_prefills()
        else:
            if self.role == COLOCATED:
                worked |= self._run_prefills()
            worked |= self._decode_round()
        return worked

    # -- prefill -------------------------------------------------------------------------------------

    def _run_prefills(self) -> bool:
        """Run every queued prefill; True if any ran."""
        ran = False
        while True:
            with self.node.lock:
                task = self.prefill_queue.pop(self.node.now())
                next_model = self.prefill_queue.prefetch_model()
            if task is None:
                return ran
            ran = True
            request = task.request
            live = self.node.live.get(request.request_id)
            if live is None or self.node.shed_if_late(request):  # aborted or shed while it waited
                with self.node.lock:
                    self.prefill_queue.complete()
                continue
            with self.node.lock:
                live.holder = self.instance_name
            self.prefilling = request
            self.node.request_moved(request.request_id, PREFILLING, self.instance_name)
            self._switch(request.model)
            if next_model is not None and next_model != request.model and self.engine.prefetch(next_model):
                self.timeline.record(EventKind.PREFETCH, next_model, self.node.now(), self.node.now())
            start = self.node.now()
            self.engine.add_request(request.request_id, live.prompt_token_ids, live.params, request.model)
            # A step runs the new prompt (it is admitted first); loop in case KV was short for it.
            while not request.token_times and self.engine.has_unfinished_requests():
                self._deliver(self.engine.step())
            self.timeline.record(
                EventKind.PREFILL, request.model, start, self.node.now(), [request.request_id], tokens=1
            )
            if not request.done:
                self.node.after_prefill(request, self)
            with self.node.lock:
                self.prefill_queue.complete()
            self.prefilling = None

    # -- decode --------------------------------------------------------------------------------------

    def _adopt_handoffs(self) -> bool:
        """Apply the inbox: import handed-over requests, drop aborted ones; True if any came."""
        adopted = False
        while True:
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                return adopted
            if isinstance(message, Abort):
                self.engine.abort_request(message.request_id)
            elif (live := self.node.live.get(message.request_id)) is not None:
                try:
                    self.engine.import_request(message)
                except InstanceDied:
                    # Its KV is still in the host pool (an import only records the blocks): the
                    # restarted engine takes the same handoff.
                    self.inbox.put(message)
                    raise
                live.in_transit = False
            else:  # aborted while its KV was in flight: the blocks are ours to free
                self.node.kv_pool.free([b for seq in message.seqs for b in seq.host_blocks])
            adopted = True

    def _decode_round(self) -> bool:
        """Plan and run one round over this instance's batches; False if it had none."""
        # Until a model's turn cost is measured, a resident model is taken as free to switch to and
        # any other at the profile's switch time.
        self.resident = self.engine.resident_models()
        resident = {m: 0.0 for m in self.resident}
        with self.node.lock:
            overhead = (
                self.prefill_queue.waiting_work_s(self.node.now()) if self.prefill_queue is not None else 0.0
            )
            plan = self.decode.plan_round(overhead_s=overhead, switch_s={**resident, **self.turn_cost_s})
        if not plan.batches:
            return False
        for index in range(len(plan.batches)):
            self._decode_turn(plan, index)  # adopts the inbox first: its members' KV, aborts
            if self.role == COLOCATED:
                self._run_prefills()
        return True

    def _decode_turn(self, plan: RoundPlan, index: int) -> None:
        batch = plan.batches[index]
        with self.node.lock:
            members = [r for r in batch.requests if not r.done]
        if not members:
            return
        # A request joins a batch (even one of this round) under the lock that queues its handoff, so
        # every member's KV is in the inbox by now, if it is not in the engine yet.
        self._adopt_handoffs()
        entered = self.node.now()
        self._switch(batch.model)
        following = plan.batches[(index + 1) % len(plan.batches)].model
        if following != batch.model and self.engine.prefetch(following):
            self.timeline.record(EventKind.PREFETCH, following, self.node.now(), self.node.now())
        ids = {r.request_id for r in members}
        self._place_on_device(batch.model, ids)
        turn = DecodeTurn.of(plan, index)
        start = self.node.now()
        steps = 0
        while True:
            with self.node.lock:
                # New prefills waiting count as a change: an open-ended turn yields to them.
                changed = self.decode.changed or (
                    self.prefill_queue is not None and len(self.prefill_queue) > 0
                )
                keep_going = turn.should_continue(self.node.now(), changed)
            live = [r for r in members if not r.done]
            if not keep_going or not live:
                break
            if not self._fits_next_step(batch.model, live):
                break
            loop_start = time.perf_counter()
            outputs = self.engine.step()
            stepped = time.perf_counter()
            self._deliver(outputs)
            steps += 1
            with self.node.lock:
                turn.step_done(self.node.now())
            self.decode_step_s += stepped - loop_start
            self.decode_loop_s += time.perf_counter() - loop_start
        self.timeline.record(
            EventKind.DECODE_TURN, batch.model, start, self.node.now(), sorted(ids), tokens=steps
        )
        cost = start - entered
        if plan.swap_out:
            swap_start = self.node.now()
            unfinished = [r.request_id for r in members if not r.done]
            self.engine.swap_out(unfinished)
            if unfinished:
                self.timeline.record(EventKind.SWAP_OUT, batch.model, swap_start, self.node.now(), unfinished)
            cost += self.node.now() - swap_start
        if len(plan.batches) > 1:
            previous = self.turn_cost_s.get(batch.model, cost)
            self.turn_cost_s[batch.model] = previous + TURN_COST_SMOOTHING * (cost - previous)

    def _fits_next_step(self, model: str, live) -> bool:
        """Whether the batch still fits its KV with the lookahead (if not, the turn ends early)."""
        with self.node.lock:
            return len(live) == 1 or self.decode.fits(model, live)

    def _place_on_device(self, model: str, batch_ids: set[str]) -> None:
        """Make the engine's running set of `model` exactly the batch: swap others out, the batch in."""
        start = self.node.now()
        swapped_in = self.engine.place(model, batch_ids)
        if swapped_in:
            self.timeline.record(EventKind.SWAP_IN, model, start, self.node.now(), swapped_in)

    # -- shared --------------------------------------------------------------------------------------

    def _switch(self, model: str) -> None:
        start = self.node.now()
        switched = self.engine.switch(model)
        if switched is not None:
            self.resident = self.engine.resident_models()
            detail = "loaded" if switched.loaded else "resident"
            self.timeline.record(EventKind.SWITCH, model, start, self.node.now(), detail=detail)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = self.node.now()
        for output in outputs:
            self.node.deliver(output, now)
