"""One instance: a device's long-lived loop running the token-level schedule on a real engine.

The schedule itself is the turn loop (aegaeon/scheduler/turn_loop.py, DESIGN.md "Token-level
scheduling"): prefill, decode or colocated, it yields commands (switch, prefetch, prefill, place a
batch, step, swap out...) and this instance carries each out on its engine.

The loop runs in the node's process, as a thread; the engine runs in the instance's own process
(`RemoteEngine`: each engine operation is one call to it). The scheduler objects (`PrefillQueue`,
`DecodeInstance`) are shared with the node's dispatchers: the turn loop is advanced under the node's
lock and the commands run outside it; the engine is only called by this instance's thread.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

from aegaeon.engine.handoff import RequestHandoff
from aegaeon.engine.outputs import RequestDelta
from aegaeon.engine.sampling_params import SamplingParams
from aegaeon.instance.remote import InstanceDied, RemoteEngine
from aegaeon.memory.kv_pool import HostKVPool
from aegaeon.scheduler.decode import DecodeInstance
from aegaeon.scheduler.predictor import Predictor
from aegaeon.scheduler.prefill import PrefillQueue
from aegaeon.scheduler.request import SchedRequest
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
    T,
    TurnLoop,
    Turns,
)

# A request's states as the node reports them (`Node.request_moved`), named as request records name them.
PREFILLING, DECODING = "prefilling", "decoding"


@dataclass(frozen=True)
class Abort:
    """Drop a request from this instance's engine, wherever it stands there."""

    request_id: str


class HeldRequest(Protocol):
    """What an instance reads and marks of a request in flight on its node (the node's LiveRequest)."""

    prompt_token_ids: list[int]
    params: SamplingParams
    # The instance whose engine holds the request, and whether its handoff is still in an inbox.
    holder: str | None
    in_transit: bool


class NodeServices(Protocol):
    """What an instance needs of its node (aegaeon.instance.node.Node)."""

    # Read-only here (properties, so the node's own, more precise types satisfy them).
    @property
    def lock(self) -> threading.Lock:
        """Guards the scheduler objects the instance shares with the node's dispatchers."""

    @property
    def stopping(self) -> bool: ...

    @property
    def live(self) -> Mapping[str, HeldRequest]:
        """The requests in flight on the node, by id."""

    @property
    def kv_pool(self) -> HostKVPool: ...

    @property
    def predictor(self) -> Predictor:
        """The scheduler's step-time predictions, which the instance calibrates with its live steps."""

    def now(self) -> float: ...

    def wait_for_work(self) -> None: ...

    def deliver(self, output: RequestDelta, now: float) -> None: ...

    def shed_if_late(self, request: SchedRequest) -> bool: ...

    def request_moved(self, request_id: str, state: str, instance: str) -> None: ...

    def after_prefill(self, request: SchedRequest, instance: Instance) -> None: ...

    def restart_instance(self, instance: Instance, death: BaseException) -> bool: ...

    def instance_failed(self, instance: Instance, error: BaseException) -> None: ...


class Instance(threading.Thread):
    """A device's turn loop over its own engine."""

    # Whether the node restarts this instance's process when it dies and resumes its requests.
    recoverable = True

    def __init__(
        self,
        name: str,
        role: str,
        engine: RemoteEngine,
        node: NodeServices,
        prefill_queue: PrefillQueue | None,
        decode: DecodeInstance | None,
    ):
        super().__init__(name=f"aegaeon-{name}", daemon=True)
        self.instance_name = name
        self.role = role
        self.engine = engine
        self.node = node
        self.turns = TurnLoop(
            name, role, prefill_queue, decode, node.now, max_events=node.config.timeline_events
        )
        self.prefill_queue = prefill_queue
        self.decode = decode
        self.timeline = self.turns.timeline
        # Requests handed over by prefill instances (a future while the export is under way; None if
        # the request was aborted meanwhile), and aborts: applied to the engine by this thread.
        self.inbox: queue.SimpleQueue[Future[RequestHandoff | None] | RequestHandoff | Abort] = (
            queue.SimpleQueue()
        )
        self.error: BaseException | None = None
        # Seconds spent inside engine.step() during decode turns, and in the whole decode steps (the
        # turn loop deciding on the step, the step, its outputs delivered): their difference is the
        # scheduler's own overhead.
        self.decode_step_s = 0.0
        self.decode_loop_s = 0.0
        # Models whose weights were in the arena at the last look (the node's heartbeat reports them).
        self.resident: list[str] = []
        # The request whose prefill runs now (claimed from the prefill queue, not yet prefilled), and
        # its prompt and parameters as claimed (an abort may remove it from the node meanwhile).
        self.prefilling: SchedRequest | None = None
        self._claimed: tuple[list[int], SamplingParams] | None = None
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
                    # The process is restarted and the requests it held resume; the loop goes on
                    # with a fresh pass (the interrupted one is dropped).
                    if not self.node.restart_instance(self, death):
                        return
            except BaseException as error:  # noqa: BLE001 - reported to every request of the node
                self.error = error
                self.node.instance_failed(self, error)
                return

    def _work(self) -> bool:
        """One pass of the turn loop; False if there was nothing to do."""
        return self._drive(self.turns.work())

    def _drive(self, turns: Turns[T]) -> T:
        """Carry out the loop's commands on the engine: the loop advances under the node's lock, each
        command runs outside it. The loop's return value."""
        result = None
        while True:
            resumed = time.perf_counter()
            with self.node.lock:
                try:
                    command = turns.send(result)
                except StopIteration as done:
                    return done.value
            if type(command) is Step:  # the loop's time deciding on a decode step counts in the step's
                self.decode_loop_s += time.perf_counter() - resumed
            result = self._execute(command)

    def _execute(self, command: Command):
        match command:
            case Step(model=model, requests=requests):
                context_lens = [r.context_len for r in requests]
                start = time.perf_counter()
                self._step()
                self.node.predictor.observe_decode(model, context_lens, time.perf_counter() - start)
                return None
            case Adopt():
                return self._adopt_handoffs()
            case Switch(model=model):
                return self._switch(model)
            case Prefetch(model=model):
                return self.engine.prefetch(model)
            case Place(model=model, requests=requests):
                return self.engine.place(model, {r.request_id for r in requests})
            case SwapOut(requests=requests):
                start = self.node.now()
                self.engine.swap_out([r.request_id for r in requests])
                return self.node.now() - start
            case ResidentModels():
                self.resident = self.engine.resident_models()
                return self.resident
            case Claim(request=request):
                return self._claim(request)
            case Prefill(request=request):
                start = time.perf_counter()
                self._prefill(request)
                if request.token_times:  # not cut short by an abort
                    elapsed = time.perf_counter() - start
                    self.node.predictor.observe_prefill(request.model, [request.prompt_len], elapsed)
                return None
            case HandOff(request=request):
                return self.node.after_prefill(request, self)
        raise TypeError(f"unknown command {command!r}")

    # -- prefill -------------------------------------------------------------------------------------

    def _claim(self, request: SchedRequest) -> bool:
        live = self.node.live.get(request.request_id)
        if live is None or self.node.shed_if_late(request):  # aborted or shed while it waited
            return False
        with self.node.lock:
            live.holder = self.instance_name
        self.prefilling = request
        self._claimed = (live.prompt_token_ids, live.params)
        self.node.request_moved(request.request_id, PREFILLING, self.instance_name)
        return True

    def _prefill(self, request: SchedRequest) -> None:
        token_ids, params = self._claimed
        self.engine.add_request(request.request_id, token_ids, params, request.model)
        # A step runs the new prompt (it is admitted first); loop in case KV was short for it,
        # but not past an abort (the inbox then drops the request from the engine).
        while not request.token_times and not request.done and self.engine.has_unfinished_requests():
            self._deliver(self.engine.step())
        self.prefilling, self._claimed = None, None

    # -- decode --------------------------------------------------------------------------------------

    def _adopt_handoffs(self) -> bool:
        """Apply the inbox: import handed-over requests, drop aborted ones; True if any came."""
        adopted = False
        while True:
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                return adopted
            if isinstance(message, Future):
                # Exported outside the node's lock: this waits only for that one copy to the host.
                message = message.result()
                if message is None:
                    continue
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

    def _step(self) -> None:
        """One engine step of the placed batch, its outputs delivered."""
        loop_start = time.perf_counter()
        outputs = self.engine.step()
        stepped = time.perf_counter()
        self._deliver(outputs)
        self.decode_step_s += stepped - loop_start
        self.decode_loop_s += time.perf_counter() - loop_start

    # -- shared --------------------------------------------------------------------------------------

    def _switch(self, model: str) -> bool | None:
        switched = self.engine.switch(model)
        if switched is None:
            return None
        self.resident = self.engine.resident_models()
        return switched.loaded

    def _deliver(self, outputs: list[RequestDelta]) -> None:
        now = self.node.now()
        for output in outputs:
            self.node.deliver(output, now)
