"""Drive the scheduler the way the simulator and a colocated instance loop do (docs/scheduling.md):
one device, time advanced by predictions, prefill groups between decode turns."""

from __future__ import annotations

from aegaeon.config import SchedulerConfig
from aegaeon.scheduler.decode import DecodeDispatcher, DecodeInstance, DecodeTurn
from aegaeon.scheduler.prefill import PrefillDispatcher, PrefillQueue
from aegaeon.scheduler.request import SchedRequest
from aegaeon.scheduler.slo import slo_report
from aegaeon.scheduler.timeline import EventKind, Timeline
from tests.scheduler.helpers import predictor, profile, spec

MODELS = ("a", "b", "c")
CONFIG = SchedulerConfig()
PRED = predictor(
    **{
        m: profile(f"shape-{m}", prefill=(0.005, 2e-5, 0.0), decode=(0.004, 1e-7, 5e-4), switch_s=0.05)
        for m in MODELS
    }
)


def _simulate(requests: list[SchedRequest]) -> Timeline:
    timeline = Timeline("dev0")
    prefill = PrefillDispatcher([PrefillQueue("dev0", PRED, CONFIG)], CONFIG)
    queue = prefill.instances[0]
    decode_instance = DecodeInstance("dev0", 1 << 30, {m: spec(m) for m in MODELS}, PRED, CONFIG)
    decode = DecodeDispatcher([decode_instance])
    arrivals = sorted(requests, key=lambda r: r.arrival_s)
    now, loaded = 0.0, None

    def admit() -> None:
        while arrivals and arrivals[0].arrival_s <= now:
            prefill.submit(arrivals.pop(0))
        prefill.dispatch(now)

    def switch_to(model: str) -> None:
        nonlocal now, loaded
        if model != loaded:
            timeline.record(EventKind.SWITCH, model, now, now + PRED.switch_s(model))
            now += PRED.switch_s(model)
            loaded = model

    def run_prefills() -> None:
        nonlocal now
        while (task := queue.pop(now)) is not None:
            switch_to(task.request.model)
            start, now = now, now + task.predicted_s
            task.request.record_token(now)
            timeline.record(EventKind.PREFILL, loaded, start, now, [task.request.request_id], tokens=1)
            queue.complete()
            if not task.request.done:
                assert decode.dispatch(task.request) is not None

    while arrivals or len(queue) or len(decode_instance):
        admit()
        run_prefills()
        plan = decode_instance.plan_round()
        if not plan.batches:
            if arrivals:
                timeline.record(EventKind.IDLE, None, now, arrivals[0].arrival_s)
                now = arrivals[0].arrival_s
            continue
        for i, batch in enumerate(plan.batches):
            switch_to(batch.model)
            turn, start = DecodeTurn.of(plan, i), now
            while turn.should_continue(now, decode_instance.changed):
                live = [r for r in batch.requests if not r.done]
                if not live:
                    break
                now += PRED.decode_s(batch.model, [r.context_len for r in live])
                for r in live:
                    r.record_token(now)
                turn.step_done(now)
                admit()  # arrivals land in the prefill queue; they run between turns
            ids = [r.request_id for r in batch.requests]
            timeline.record(EventKind.DECODE_TURN, batch.model, start, now, ids, tokens=turn.steps)
            if plan.swap_out:
                timeline.record(EventKind.SWAP_OUT, batch.model, now, now, ids)
            run_prefills()
    return timeline


def test_three_models_share_one_device_token_by_token() -> None:
    requests = [
        SchedRequest(f"{m}{i}", m, arrival_s=0.01 * (3 * i + k), prompt_len=32, max_tokens=300)
        for i in range(3)
        for k, m in enumerate(MODELS)
    ]
    timeline = _simulate(requests)
    assert all(r.finished_s is not None and r.generated == 300 for r in requests)
    # Each model was switched out with unfinished requests and resumed them later.
    assert all(timeline.interleaved(m) for m in MODELS)
    report = slo_report(requests, CONFIG)
    assert report.mean_score == 1.0 and report.attainment == 1.0
    assert report.tbt_s["p50"] < CONFIG.default_slo.tbt_s
    # The timeline is consistent: events of this instance never overlap.
    events = [e for e in timeline.events if e.kind is not EventKind.SWAP_OUT]
    assert all(a.end_s <= b.start_s + 1e-12 for a, b in zip(events, events[1:], strict=False))
