"""What one simulation run found: SLO figures, device utilisation, and policy notes."""

from __future__ import annotations

from dataclasses import dataclass, field

from aegaeon.scheduler.request import SchedRequest
from aegaeon.scheduler.slo import SLOReport
from aegaeon.sim.policies.base import COMPUTE_ACTIVITIES


@dataclass
class SimResult:
    """One policy on one workload and cluster."""

    policy: str
    num_models: int
    gpus: int
    layout: str
    device: str
    horizon_s: float
    report: SLOReport
    # Device-seconds per activity, summed over devices.
    busy_s: dict[str, float]
    notes: dict
    wall_s: float
    events: int
    requests: list[SchedRequest] = field(repr=False, default_factory=list)
    # Mean seconds of a finished request's latency by component (aegaeon.sim.breakdown; aegaeon only).
    breakdown: dict[str, float] = field(default_factory=dict)

    @property
    def attainment(self) -> float:
        """The paper's SLO attainment: mean over requests of the artifact's QoS score."""
        return self.report.attainment if self.report.attainment is not None else 0.0

    @property
    def stall_attainment(self) -> float:
        """Mean over requests of the every-stall-charged score."""
        return self.report.stall_attainment if self.report.stall_attainment is not None else 0.0

    @property
    def strict_attainment(self) -> float:
        """Share of requests that finished, met TTFT and kept every token gap within TBT."""
        return self.report.strict_attainment if self.report.strict_attainment is not None else 0.0

    @property
    def utilisation(self) -> float:
        """Share of the pool's device time spent computing tokens (prefill and decode)."""
        total = self.gpus * self.horizon_s
        return sum(self.busy_s.get(k, 0.0) for k in COMPUTE_ACTIVITIES) / total if total > 0 else 0.0

    def busy_share(self) -> dict[str, float]:
        total = self.gpus * self.horizon_s
        return {k: v / total for k, v in sorted(self.busy_s.items())} if total > 0 else {}

    def to_dict(self) -> dict:
        r = self.report
        return {
            "policy": self.policy,
            "models": self.num_models,
            "gpus": self.gpus,
            "layout": self.layout,
            "device": self.device,
            "requests": r.num_requests,
            "finished": r.num_finished,
            "failed": r.num_failed,
            "unfinished": r.num_unfinished,
            "attainment": self.attainment,
            "stall_attainment": self.stall_attainment,
            "strict_attainment": self.strict_attainment,
            "share_at_target": r.share_at_target,
            "target": r.target,
            "mean_ttft_s": r.mean_ttft_s,
            "ttft_s": r.ttft_s,
            "tbt_s": r.tbt_s,
            "gpu_utilisation": self.utilisation,
            "busy_share": self.busy_share(),
            "horizon_s": self.horizon_s,
            "notes": self.notes,
            "wall_s": self.wall_s,
            "events": self.events,
            "latency_breakdown_s": self.breakdown,
        }
