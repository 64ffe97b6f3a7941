from __future__ import annotations

import json

import pytest

from aegaeon.config import SLO, SchedulerConfig
from aegaeon.scheduler.request import SchedRequest
from aegaeon.scheduler.slo import paper_qos, request_score, slo_report, slo_report_by_model

# Binary-exact numbers so the hand arithmetic below is exact.
SLO_ = SLO(ttft_s=1.0, tbt_s=0.25)
CONFIG = SchedulerConfig(default_slo=SLO_)


def _request(
    rid: str,
    times: list[float],
    max_tokens: int | None = None,
    arrival: float = 0.0,
    finished: bool = True,
    model: str = "m",
) -> SchedRequest:
    r = SchedRequest(rid, model, arrival, prompt_len=8, max_tokens=max_tokens or max(len(times), 1))
    for t in times:
        r.record_token(t)
    if finished:
        r.finish(times[-1] if times else arrival)
    return r


# The paper artifact's walk (aegaeon/scheduler/slo.py): start = arrival, target = TTFT, accum = 0,
# qos = 0; per token t: if t - start <= target then accum = target else {qos += accum; start = t;
# accum = 0}; then target += TBT; at the end qos += min(target, t_K - start); QoS = qos / (t_K - arrival).


def test_paper_qos_on_the_artifacts_own_example() -> None:
    # Arrival 0, tokens 3, 6, 7, 8; TTFT 3, TBT 2.
    # t=3: 3 - 0 <= 3 -> accum 3, target 5.  t=6: 6 > 5 -> qos 3, start 6, target 7.
    # t=7: 1 <= 7 -> accum 7, target 9.  t=8: 2 <= 9 -> accum 9, target 11.  End: qos += min(11, 2) -> 5.
    # QoS = 5 / 8. Every stall charged: deadlines 3, 5, 7, 9; late only over [5, 6) -> 1 - 1/8.
    slo = SLO(ttft_s=3.0, tbt_s=2.0)
    assert paper_qos(0.0, [3.0, 6.0, 7.0, 8.0], 3.0, 2.0) == 0.625
    s = request_score(_request("r", [3.0, 6.0, 7.0, 8.0]), slo)
    assert (s.qos, s.stall_score) == (0.625, 0.875)


def test_on_time_request_scores_one() -> None:
    # Targets 1, 1.25, 1.5 all met (end target 1.75); qos = min(1.75, 1.0 - 0) = 1.0 over a 1.0 s lifetime.
    s = request_score(_request("r", [0.5, 0.75, 1.0]), SLO_)
    assert (s.qos, s.stall_score, s.token_score, s.ttft_s) == (1.0, 1.0, 1.0, 0.5)
    assert s.met_ttft and s.met_every_tbt and s.strict


def test_late_first_token_hand_computed() -> None:
    # Paper: t=2: 2 > 1 -> qos += 0, start 2, target 1.25. t=2.25: 0.25 <= 1.25, target 1.5.
    # t=2.5: 0.5 <= 1.5, target 1.75. End: qos += min(1.75, 0.5) -> 0.5 of a 2.5 s lifetime = 0.2.
    # Every stall charged: deadlines 1, 1.25, 1.5; late over [1, 2.5) = 1.5 s of 2.5 s -> 0.4.
    s = request_score(_request("r", [2.0, 2.25, 2.5]), SLO_)
    assert s.qos == pytest.approx(0.2) and s.stall_score == pytest.approx(1 - 1.5 / 2.5)
    assert s.token_score == 0.0
    assert not s.met_ttft and s.met_every_tbt and not s.strict


def test_stall_mid_stream_hand_computed() -> None:
    # Paper: 0.5 and 0.75 meet targets 1 and 1.25 (accum 1.25, target 1.5); t=2: 2 > 1.5 -> qos 1.25,
    # start 2, target 1.75; t=2.25: 0.25 <= 1.75, target 2. End: qos += min(2, 0.25) -> 1.5 of 2.25.
    # Every stall charged: deadlines 1, 1.25, 1.5, 1.75; late [1.5, 2.0) ∪ [1.75, 2.25) = 0.75 s.
    s = request_score(_request("r", [0.5, 0.75, 2.0, 2.25]), SLO_)
    assert s.qos == pytest.approx(1.5 / 2.25) and s.stall_score == pytest.approx(1 - 0.75 / 2.25)
    assert s.token_score == 0.5


def test_paper_score_forgives_later_stalls_every_stall_charged_does_not() -> None:
    # Tokens 0.5, 3.0, 3.25, 6.0. Paper: 0.5 meets 1 (accum 1, target 1.25); 3.0 > 1.25 -> qos 1,
    # start 3, target 1.5; 3.25: 0.25 <= 1.5 -> accum 1.5, target 1.75; 6.0: 3.0 > 1.75 -> qos 2.5,
    # start 6, target 2. End: qos += min(2, 0) -> 2.5 of a 6 s lifetime.
    # Every stall charged: deadlines 1, 1.25, 1.5, 1.75; late [1.25, 3) ∪ [1.5, 3.25) ∪ [1.75, 6) = 4.75 s.
    s = request_score(_request("r", [0.5, 3.0, 3.25, 6.0]), SLO_)
    assert s.qos == pytest.approx(2.5 / 6) and s.stall_score == pytest.approx(1 - 4.75 / 6)
    # A 1 s gap after the first stall: the grown target (2.0 from start 3) absorbs it.
    # 0.5 ok; 3.0 miss -> qos 1, start 3, target 1.5; 3.25, 3.5, 4.5, 4.75 meet 1.5, 1.75, 2.0, 2.25
    # (offsets 0.25, 0.5, 1.5, 1.75); end target 2.5: qos += min(2.5, 1.75) -> 2.75 of 4.75.
    s = request_score(_request("r", [0.5, 3.0, 3.25, 3.5, 4.5, 4.75]), SLO_)
    assert s.qos == pytest.approx(2.75 / 4.75)


def test_running_deadline_absorbs_a_stall_but_strict_does_not() -> None:
    # Early tokens bank slack: a 0.75 s gap still meets the running deadlines (1.5 and 1.75).
    # Paper: targets 1, 1.25, 1.5, 1.75 met; end qos = min(2.0, 1.75) = the whole lifetime.
    s = request_score(_request("r", [0.5, 0.75, 1.5, 1.75]), SLO_)
    assert s.qos == 1.0 and s.stall_score == 1.0 and s.token_score == 1.0
    assert s.met_ttft and not s.met_every_tbt and not s.strict


def test_no_first_token_or_failure_scores_zero() -> None:
    never = _request("n", [], max_tokens=4, finished=False)
    s = request_score(never, SLO_, horizon_s=0.5)  # even before its TTFT deadline
    assert s.qos == 0.0 and s.stall_score == 0.0
    failed = _request("f", [0.5, 0.75], max_tokens=10, finished=False)
    failed.fail(0.8)
    s = request_score(failed, SLO_)
    assert s.qos == 0.0 and s.stall_score == 0.0 and s.token_score == 0.0
    assert not s.strict and s.ttft_s == 0.5


def test_unfinished_request_is_late_until_the_horizon() -> None:
    # One token at 0.5, nothing more by the horizon 3.0.
    # Paper, the horizon checked as a token: 0.5 meets 1 (accum 1, target 1.25); 3.0 > 1.25 -> qos 1,
    # start 3; end qos += min(1.5, 0) -> 1 of 3 s.
    # Every stall charged: the next token was due at 1.25 -> late 1.75 s of 3 s.
    r = _request("u", [0.5], max_tokens=10, finished=False)
    s = request_score(r, SLO_, horizon_s=3.0)
    assert s.qos == pytest.approx(1 / 3) and s.stall_score == pytest.approx(1 - 1.75 / 3.0)
    # Tokens 1..7 were due before 3.0 (1 + 7·0.25 = 2.75); 1 of 8 due tokens came on time.
    assert s.token_score == pytest.approx(1 / 8)
    assert not s.strict


def test_unfinished_but_on_schedule_is_not_penalised() -> None:
    # Paper: 0.5, 0.75 and the horizon 1.0 meet 1, 1.25, 1.5; end qos = min(1.75, 1.0) = the lifetime.
    r = _request("u", [0.5, 0.75], max_tokens=10, finished=False)
    s = request_score(r, SLO_, horizon_s=1.0)
    assert s.qos == 1.0 and s.stall_score == 1.0


def test_report_hand_computed() -> None:
    requests = [
        _request("ok", [0.5, 0.75, 1.0]),  # qos 1, stall score 1, strict
        _request("late", [2.0, 2.25, 2.5]),  # qos 0.2, stall score 0.4
        _request("stall", [0.5, 0.75, 1.5, 1.75]),  # qos 1, stall score 1, not strict
        _request("never", [], max_tokens=3, finished=False),  # 0, 0
    ]
    report = slo_report(requests, CONFIG)
    assert report.num_requests == 4 and report.num_finished == 3 and report.num_unfinished == 1
    assert report.attainment == pytest.approx((1 + 0.2 + 1 + 0) / 4)
    assert report.stall_attainment == pytest.approx((1 + 0.4 + 1 + 0) / 4)
    assert report.share_at_target == 0.5  # qos >= 0.9: ok and stall
    assert report.strict_attainment == 0.25  # only ok
    assert report.mean_ttft_s == pytest.approx(1.0)  # (0.5 + 2 + 0.5) / 3
    assert report.ttft_s["p50"] == 0.5
    # Gaps: six of 0.25 and one of 0.75; p99 interpolates between the 6th and 7th sorted values.
    assert report.tbt_s["p50"] == 0.25 and report.tbt_s["p99"] == pytest.approx(0.25 + 0.94 * 0.5)
    json.dumps(report.to_dict())


def test_report_uses_each_models_slo() -> None:
    config = SchedulerConfig(default_slo=SLO_, model_slos=(("strict", SLO(ttft_s=0.25, tbt_s=0.25)),))
    requests = [_request("a", [0.5, 0.75], model="lenient"), _request("b", [0.5, 0.75], model="strict")]
    by_model = slo_report_by_model(requests, config)
    assert by_model["lenient"].strict_attainment == 1.0
    assert by_model["strict"].strict_attainment == 0.0
    assert slo_report(requests, config).strict_attainment == 0.5


def test_empty_report() -> None:
    report = slo_report([], CONFIG)
    assert report.num_requests == 0 and report.attainment is None and report.stall_attainment is None
    assert report.share_at_target is None and report.strict_attainment is None
    assert report.ttft_s == {"p50": None, "p90": None, "p99": None}
