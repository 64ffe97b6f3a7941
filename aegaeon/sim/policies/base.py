"""What every simulated policy provides to the runner: a deployment that takes requests."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from aegaeon.config import SchedulerConfig
from aegaeon.scheduler.request import SchedRequest
from aegaeon.sim.cluster import ClusterConfig
from aegaeon.sim.events import EventLoop
from aegaeon.sim.models import ModelSet

# Activities that compute tokens (the rest is switching, loading and moving KV).
COMPUTE_ACTIVITIES = ("prefill", "decode")


@dataclass(frozen=True)
class SimContext:
    """Everything a policy builds its deployment from."""

    loop: EventLoop
    models: ModelSet
    cluster: ClusterConfig
    scheduler: SchedulerConfig
    # Mean requests/s of each model in the workload (placement decisions of the baselines use it).
    rates: Mapping[str, float]


class Deployment(ABC):
    """A policy's devices, running in the event loop."""

    @abstractmethod
    def submit(self, request: SchedRequest) -> None:
        """A request arrives now."""

    @abstractmethod
    def busy_s(self) -> dict[str, float]:
        """Device-seconds spent per activity ("prefill", "decode", "switch", "swap", ...), all devices."""

    @property
    @abstractmethod
    def gpus(self) -> int:
        """Devices the deployment occupies."""

    def notes(self) -> dict:
        """Policy-specific facts worth reporting (placements, models left unserved, ...)."""
        return {}

    def latency_breakdown(self, requests: Sequence[SchedRequest]) -> dict[str, float]:
        """Mean seconds of a finished request's latency per component (aegaeon.sim.breakdown), where
        the policy tracks them ({} otherwise)."""
        return {}


def model_load(models: ModelSet, rates: Mapping[str, float], model: str) -> float:
    """Rough relative demand of a model: its request rate times its size (switch and decode cost)."""
    return rates.get(model, 0.0) * models.weight_bytes(model)


def total_busy_s(engines: Iterable, devices_per_engine: int = 1) -> dict[str, float]:
    """Device seconds by kind of work (prefill, decode, load...) summed over engines with `busy_s`;
    an engine of several devices (tensor parallel) keeps all of them busy."""
    totals: dict[str, float] = defaultdict(float)
    for engine in engines:
        for kind, seconds in engine.busy_s.items():
            totals[kind] += seconds * devices_per_engine
    return dict(totals)
