"""SLO metrics: each request's scores and the aggregate report of a run.

Three views of one request against its model's TTFT and TBT targets (DESIGN.md, "SLO metric"):

- `qos`, the paper's score, computed exactly as its artifact does (`compute_request_metrics`): walk the
  tokens with a running target that starts at TTFT and grows by TBT per token; a token later than its
  target (measured from the current start) closes the span so far, credited up to the last met target,
  and restarts the span at that token. The target is never reset, so after one stall the later tokens
  rarely miss again. QoS is the credited time over the request's lifetime (arrival to last token). Its
  mean over requests is *the* attainment, the figure comparable with the paper's.
- `stall_score`, every stall charged: the first token is due by arrival + TTFT and the k-th after it by
  arrival + TTFT + k·TBT; the request is late from each deadline until that token comes out, and the
  score is the share of its lifetime it was not late. Stricter than `qos` on streams that stall
  repeatedly, more lenient on one early stall.
- `strict`: finished, met TTFT and kept every gap between consecutive tokens within TBT.

Honest accounting: a request that failed, or never produced a first token, scores 0. A request still
running at the horizon (the end of the measurement) lives until the horizon: for `qos` the horizon is
checked like one more token, for `stall_score` the token it owes counts late from its deadline on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from aegaeon.config import DEFAULT_ATTAINMENT_TARGET, SLO, SchedulerConfig
from aegaeon.scheduler.request import SchedRequest

REPORT_PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class RequestScore:
    """How one request fared against its model's SLO."""

    request_id: str
    model: str
    qos: float  # the paper's score: credited share of the lifetime (module docstring)
    stall_score: float  # every stall charged: share of the lifetime not late for a token
    token_score: float  # fraction of its due tokens that came by their deadline
    ttft_s: float | None
    met_ttft: bool
    met_every_tbt: bool  # every gap between consecutive tokens within TBT
    strict: bool  # finished, met TTFT and every TBT


def paper_qos(arrival_s: float, token_times: Sequence[float], ttft_s: float, tbt_s: float) -> float:
    """The paper artifact's per-request QoS over a token stream (module docstring), in [0, 1]."""
    if not token_times:
        return 0.0
    start, target, accum, qos = arrival_s, ttft_s, 0.0, 0.0
    for t in token_times:
        if t - start <= target:
            accum = target
        else:
            # A miss: the span since `start` is credited up to its last met target; a new one starts.
            qos += accum
            start, accum = t, 0.0
        target += tbt_s
    qos += min(target, token_times[-1] - start)
    lifetime = token_times[-1] - arrival_s
    if lifetime <= 0:
        return 1.0
    return min(max(qos / lifetime, 0.0), 1.0)


def _merged_length(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length of the union of intervals sorted by start."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in intervals:
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def request_score(request: SchedRequest, slo: SLO, horizon_s: float | None = None) -> RequestScore:
    """Score one request; `horizon_s` is when measurement ended (needed for requests still running)."""
    times = request.token_times
    ttft = times[0] - request.arrival_s if times else None
    met_ttft = ttft is not None and ttft <= slo.ttft_s
    gaps = np.diff(times)
    met_every_tbt = bool(np.all(gaps <= slo.tbt_s))
    if request.failed or not times:
        return RequestScore(
            request.request_id, request.model, 0.0, 0.0, 0.0, ttft, met_ttft, met_every_tbt, False
        )

    first_due = request.arrival_s + slo.ttft_s
    deadlines = [first_due + k * slo.tbt_s for k in range(len(times))]
    late = [(due, t) for due, t in zip(deadlines, times, strict=True) if t > due]
    on_time = len(times) - len(late)
    due_count = len(times)
    end = times[-1]
    checked = list(times)
    finished = request.finished_s is not None
    if not finished:
        end = max(end, horizon_s if horizon_s is not None else end)
        if end > times[-1] and request.remaining_tokens > 0:
            # The paper's walk checks the horizon as if the owed token came then.
            checked.append(end)
        next_due = first_due + len(times) * slo.tbt_s
        if next_due < end and request.remaining_tokens > 0:
            # Owed tokens: only the first one's late interval matters (the rest lie inside it).
            late.append((next_due, end))
            # Tokens k >= len(times) with deadline first_due + k·TBT before the end.
            overdue = math.ceil((end - first_due) / slo.tbt_s) - len(times)
            due_count += min(max(overdue, 1), request.remaining_tokens)

    lifetime = end - request.arrival_s
    late_s = _merged_length(late)
    if lifetime > 0:
        stall_score = min(max(1.0 - late_s / lifetime, 0.0), 1.0)
    else:
        stall_score = 0.0 if late_s > 0 else 1.0
    qos = paper_qos(request.arrival_s, checked, slo.ttft_s, slo.tbt_s)
    strict = finished and met_ttft and met_every_tbt
    return RequestScore(
        request.request_id,
        request.model,
        qos,
        stall_score,
        on_time / due_count,
        ttft,
        met_ttft,
        met_every_tbt,
        strict,
    )


def latest_event_s(requests: Sequence[SchedRequest]) -> float:
    """The latest arrival, token or finish of any request: the default horizon."""
    events = [r.arrival_s for r in requests] + [r.finished_s for r in requests if r.finished_s is not None]
    events += [r.token_times[-1] for r in requests if r.token_times]
    return max(events, default=0.0)


def _percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if len(values) == 0:
        return {f"p{p}": None for p in REPORT_PERCENTILES}
    found = np.percentile(values, REPORT_PERCENTILES)
    return {f"p{p}": float(v) for p, v in zip(REPORT_PERCENTILES, found, strict=True)}


@dataclass(frozen=True)
class SLOReport:
    """Aggregate SLO figures of a set of requests (None where there is nothing to measure)."""

    num_requests: int
    num_finished: int
    num_failed: int
    num_unfinished: int
    # The paper's attainment: mean `qos` over requests (failed ones count 0).
    attainment: float | None
    # Mean `stall_score`: every stall charged.
    stall_attainment: float | None
    # Share of requests that finished, met TTFT and kept every gap within TBT.
    strict_attainment: float | None
    # Share of requests whose `qos` is at least `target`.
    share_at_target: float | None
    mean_token_score: float | None
    target: float
    mean_ttft_s: float | None
    ttft_s: dict[str, float | None]  # percentiles, keys "p50", "p90", "p99"
    tbt_s: dict[str, float | None]  # percentiles of every gap between consecutive tokens

    def to_dict(self) -> dict:
        return asdict(self)


def slo_report(
    requests: Iterable[SchedRequest],
    config: SchedulerConfig,
    horizon_s: float | None = None,
    target: float = DEFAULT_ATTAINMENT_TARGET,
) -> SLOReport:
    """Score every request against its model's SLO and aggregate.

    `horizon_s` defaults to the latest event seen in any request (arrival, token, finish).
    """
    requests = list(requests)
    if horizon_s is None:
        horizon_s = latest_event_s(requests)
    scores = [request_score(r, config.slo(r.model), horizon_s) for r in requests]
    ttfts = [s.ttft_s for s in scores if s.ttft_s is not None]
    gaps = np.concatenate([np.diff(r.token_times) for r in requests]) if requests else np.array([])
    count = len(scores)

    def share(flags: Iterable[bool]) -> float | None:
        return sum(flags) / count if count else None

    def mean(values: Iterable[float]) -> float | None:
        return float(np.mean(list(values))) if count else None

    return SLOReport(
        num_requests=count,
        num_finished=sum(1 for r in requests if r.finished_s is not None and not r.failed),
        num_failed=sum(1 for r in requests if r.failed),
        num_unfinished=sum(1 for r in requests if not r.done),
        attainment=mean(s.qos for s in scores),
        stall_attainment=mean(s.stall_score for s in scores),
        strict_attainment=share(s.strict for s in scores),
        share_at_target=share(s.qos >= target for s in scores),
        mean_token_score=mean(s.token_score for s in scores),
        target=target,
        mean_ttft_s=float(np.mean(ttfts)) if ttfts else None,
        ttft_s=_percentiles(ttfts),
        tbt_s=_percentiles(gaps),
    )


def slo_report_by_model(
    requests: Iterable[SchedRequest],
    config: SchedulerConfig,
    horizon_s: float | None = None,
    target: float = DEFAULT_ATTAINMENT_TARGET,
) -> dict[str, SLOReport]:
    """`slo_report` per model, all against the same horizon."""
    requests = list(requests)
    if horizon_s is None:
        horizon_s = latest_event_s(requests)
    models = dict.fromkeys(r.model for r in requests)
    return {m: slo_report([r for r in requests if r.model == m], config, horizon_s, target) for m in models}
