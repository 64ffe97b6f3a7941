"""The turn loop on its own: a tiny driver carries its commands out on a clock advanced by predictions
(the simulator does the same with a latency model, the live instance on an engine)."""

from __future__ import annotations

import pytest

from aegaeon.config import SchedulerConfig
from aegaeon.scheduler.decode import DecodeDispatcher, DecodeInstance
from aegaeon.scheduler.prefill import PrefillDispatcher, PrefillQueue
from aegaeon.scheduler.request import SchedRequest
from aegaeon.scheduler.slo import slo_report
from aegaeon.scheduler.timeline import EventKind
from aegaeon.scheduler.turn_loop import (
    COLOCATED,
    DECODE,
    PREFILL,
    Adopt,
    Claim,
    HandOff,
    Place,
    Prefetch,
    Prefill,
    ResidentModels,
    Step,
    SwapOut,
    Switch,
    TurnLoop,
    Turns,
)
from tests.scheduler.helpers import predictor, profile, req, spec

MODELS = ("a", "b", "c")
CONFIG = SchedulerConfig()
SWITCH_S = 0.05
SWAP_OUT_S = 0.01
PRED = predictor(
    **{
        m: profile(f"shape-{m}", prefill=(0.005, 2e-5, 0.0), decode=(0.004, 1e-7, 5e-4), switch_s=SWITCH_S)
        for m in MODELS
    }
)


class Device:
    """One device on a clock: a command takes its predicted time; one model's weights fit at a time."""

    def __init__(self, turns: TurnLoop, decode: DecodeDispatcher | None = None, claim: bool = True) -> None:
        self.turns = turns
        self.decode = decode
        self.claim = claim
        self.now = 0.0
        self.active: str | None = None
        self.commands: list = []

    def drive(self, process: Turns):
        result = None
        while True:
            try:
                command = process.send(result)
            except StopIteration as done:
                return done.value
            self.commands.append(command)
            result = self.execute(command)

    def execute(self, command):
        match command:
            case Switch(model=model):
                if model == self.active:
                    return None
                self.now += PRED.switch_s(model)
                self.active = model
                return True
            case Prefill(request=request):
                self.now += PRED.prefill_s(request.model, [request.prompt_len])
                request.record_token(self.now)
            case Step(model=model, requests=requests):
                self.now += PRED.decode_s(model, [r.context_len for r in requests])
                for request in requests:
                    request.record_token(self.now)
            case SwapOut():
                self.now += SWAP_OUT_S
                return SWAP_OUT_S
            case HandOff(request=request):
                assert self.decode.dispatch(request) is not None
            case Claim():
                return self.claim
            case ResidentModels():
                return [self.active] if self.active else []
            case Place():
                return []
            case Adopt() | Prefetch():
                return False
        return None


def _turn_loop(role: str) -> tuple[TurnLoop, Device, PrefillDispatcher | None]:
    queue = PrefillQueue("dev0", PRED, CONFIG) if role != DECODE else None
    instance = DecodeInstance("dev0", 1 << 30, {m: spec(m) for m in MODELS}, PRED, CONFIG)
    instance = instance if role != PREFILL else None
    turns = TurnLoop("dev0", role, queue, instance, lambda: device.now)
    device = Device(turns)
    prefill = PrefillDispatcher([queue], CONFIG) if queue is not None else None
    device.decode = DecodeDispatcher([instance]) if instance is not None else None
    return turns, device, prefill


def test_three_models_share_one_colocated_device_token_by_token() -> None:
    requests = [
        SchedRequest(f"{m}{i}", m, arrival_s=0.01 * (3 * i + k), prompt_len=32, max_tokens=300)
        for i in range(3)
        for k, m in enumerate(MODELS)
    ]
    turns, device, prefill = _turn_loop(COLOCATED)
    arrivals = list(requests)
    while arrivals or len(turns.prefill_queue) or len(turns.decode):
        while arrivals and arrivals[0].arrival_s <= device.now:
            prefill.submit(arrivals.pop(0))
        prefill.dispatch(device.now)
        if not device.drive(turns.work()) and arrivals:
            device.now = arrivals[0].arrival_s
    timeline = turns.timeline
    assert all(r.finished_s is not None and r.generated == 300 for r in requests)
    # Each model was switched out with unfinished requests and resumed them later.
    assert all(timeline.interleaved(m) for m in MODELS)
    report = slo_report(requests, CONFIG)
    assert report.attainment == 1.0 and report.stall_attainment == 1.0
    assert report.tbt_s["p50"] < CONFIG.default_slo.tbt_s
    # The timeline is consistent: events of this instance never overlap.
    events = timeline.events
    assert all(a.end_s <= b.start_s + 1e-12 for a, b in zip(events, events[1:], strict=False))


def test_a_round_of_two_models_switches_steps_and_swaps_out_each_turn() -> None:
    turns, device, _ = _turn_loop(DECODE)
    for model in ("a", "b"):
        device.decode.dispatch(req(f"{model}1", model, 0.0, generated=1))
    assert device.drive(turns.decode_round())
    kinds = [type(c) for c in device.commands]
    # Consecutive steps collapsed: the order of one turn, twice.
    collapsed = [k for i, k in enumerate(kinds) if i == 0 or k is not Step or kinds[i - 1] is not Step]
    # The batch's KV is placed before the next model's prefetch is issued (KV moves go first).
    turn = [Adopt, Switch, Place, Prefetch, Step, SwapOut]
    assert collapsed == [ResidentModels, *turn, *turn]
    switches = [c.model for c in device.commands if isinstance(c, Switch)]
    prefetches = [c.model for c in device.commands if isinstance(c, Prefetch)]
    assert switches == ["a", "b"] and prefetches == ["b", "a"]  # the next turn's model each time
    # The first measured cost of a turn: its switch and its swap-out.
    assert turns.turn_cost_s == pytest.approx({"a": SWITCH_S + SWAP_OUT_S, "b": SWITCH_S + SWAP_OUT_S})
    timeline = turns.timeline
    assert [e.detail for e in timeline.of_kind(EventKind.SWITCH)] == ["loaded", "loaded"]
    decode_turns = timeline.of_kind(EventKind.DECODE_TURN)
    assert [e.model for e in decode_turns] == ["a", "b"]
    assert sum(e.tokens for e in decode_turns) == sum(isinstance(c, Step) for c in device.commands)
    assert [e.duration_s for e in timeline.of_kind(EventKind.SWAP_OUT)] == pytest.approx([SWAP_OUT_S] * 2)


def test_a_request_gone_when_claimed_is_dropped_without_a_switch() -> None:
    turns, device, prefill = _turn_loop(PREFILL)
    device.claim = False
    request = req("r1", "a", 0.0)
    prefill.submit(request)
    prefill.dispatch(0.0)
    assert device.drive(turns.work())  # the queue had work
    assert [type(c) for c in device.commands] == [Adopt, Claim]
    assert len(turns.prefill_queue) == 0 and turns.prefill_queue.running is None
    assert not request.token_times and not turns.timeline.events


def test_a_role_gets_the_scheduler_objects_it_runs() -> None:
    queue = PrefillQueue("dev0", PRED, CONFIG)
    with pytest.raises(ValueError, match="role"):
        TurnLoop("dev0", "both", queue, None, lambda: 0.0)
    with pytest.raises(ValueError, match="decode instance"):
        TurnLoop("dev0", DECODE, queue, None, lambda: 0.0)
