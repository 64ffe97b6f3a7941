from __future__ import annotations

import json

import pytest

from aegaeon.config import SLO, SchedulerConfig
from aegaeon.scheduler.request import SchedRequest
from aegaeon.scheduler.slo import request_score, slo_report, slo_report_by_model

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


def test_on_time_request_scores_one() -> None:
    s = request_score(_request("r", [0.5, 0.75, 1.0]), SLO_)
    assert (s.score, s.token_score, s.ttft_s) == (1.0, 1.0, 0.5)
    assert s.met_ttft and s.met_every_tbt and s.strict


def test_late_first_token_hand_computed() -> None:
    # Deadlines 1, 1.25, 1.5; tokens 2, 2.25, 2.5: late over [1, 2.5) = 1.5 s of a 2.5 s lifetime.
    s = request_score(_request("r", [2.0, 2.25, 2.5]), SLO_)
    assert s.score == pytest.approx(1 - 1.5 / 2.5) and s.token_score == 0.0
    assert not s.met_ttft and s.met_every_tbt and not s.strict


def test_stall_mid_stream_hand_computed() -> None:
    # Deadlines 1, 1.25, 1.5, 1.75; tokens 0.5, 0.75, 2.0, 2.25: late [1.5, 2.0) ∪ [1.75, 2.25) = 0.75 s.
    s = request_score(_request("r", [0.5, 0.75, 2.0, 2.25]), SLO_)
    assert s.score == pytest.approx(1 - 0.75 / 2.25) and s.token_score == 0.5


def test_running_deadline_absorbs_a_stall_but_strict_does_not() -> None:
    # Early tokens bank slack: a 0.75 s gap still meets the running deadlines (1.5 and 1.75).
    s = request_score(_request("r", [0.5, 0.75, 1.5, 1.75]), SLO_)
    assert s.score == 1.0 and s.token_score == 1.0
    assert s.met_ttft and not s.met_every_tbt and not s.strict


def test_no_first_token_or_failure_scores_zero() -> None:
    never = _request("n", [], max_tokens=4, finished=False)
    assert request_score(never, SLO_, horizon_s=0.5).score == 0.0  # even before its TTFT deadline
    failed = _request("f", [0.5, 0.75], max_tokens=10, finished=False)
    failed.fail(0.8)
    s = request_score(failed, SLO_)
    assert s.score == 0.0 and s.token_score == 0.0 and not s.strict and s.ttft_s == 0.5


def test_unfinished_request_is_late_until_the_horizon() -> None:
    # One token at 0.5; the next was due at 1.25, nothing by the horizon 3.0: late 1.75 s of 3 s.
    r = _request("u", [0.5], max_tokens=10, finished=False)
    s = request_score(r, SLO_, horizon_s=3.0)
    assert s.score == pytest.approx(1 - 1.75 / 3.0)
    # Tokens 1..7 were due before 3.0 (1 + 7·0.25 = 2.75); 1 of 8 due tokens came on time.
    assert s.token_score == pytest.approx(1 / 8)
    assert not s.strict


def test_unfinished_but_on_schedule_is_not_penalised() -> None:
    r = _request("u", [0.5, 0.75], max_tokens=10, finished=False)
    assert request_score(r, SLO_, horizon_s=1.0).score == 1.0


def test_report_hand_computed() -> None:
    requests = [
        _request("ok", [0.5, 0.75, 1.0]),  # score 1, strict
        _request("late", [2.0, 2.25, 2.5]),  # score 0.4
        _request("stall", [0.5, 0.75, 1.5, 1.75]),  # score 1, not strict
        _request("never", [], max_tokens=3, finished=False),  # 0
    ]
    report = slo_report(requests, CONFIG)
    assert report.num_requests == 4 and report.num_finished == 3 and report.num_unfinished == 1
    assert report.mean_score == pytest.approx((1 + 0.4 + 1 + 0) / 4)
    assert report.attainment == 0.5  # scores >= 0.9: ok and stall
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
    assert report.num_requests == 0 and report.mean_score is None and report.attainment is None
    assert report.ttft_s == {"p50": None, "p90": None, "p99": None}
