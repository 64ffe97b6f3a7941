"""Run one policy on one workload: requests in at their arrival times, the event loop, the SLO report."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from aegaeon.config import SchedulerConfig
from aegaeon.scheduler.request import SchedRequest
from aegaeon.scheduler.slo import slo_report
from aegaeon.sim.cluster import ClusterConfig
from aegaeon.sim.events import EventLoop
from aegaeon.sim.models import ModelSet
from aegaeon.sim.policies import aegaeon, dedicated, mux, serverless
from aegaeon.sim.policies.base import Deployment, SimContext
from aegaeon.sim.result import SimResult
from aegaeon.sim.trace import trace_duration_s
from aegaeon.sim.workload import Arrival

# After the last arrival, requests may run this long before the run is cut (unfinished ones then
# count as late from their deadline to the cut, failed ones as 0).
DEFAULT_DRAIN_S = 300.0


@dataclass(frozen=True)
class SimOptions:
    """Knobs of a run beyond the cluster and the scheduler."""

    drain_s: float = DEFAULT_DRAIN_S
    aegaeon: aegaeon.AegaeonOptions = field(default_factory=aegaeon.AegaeonOptions)
    serverless: serverless.ServerlessOptions = field(default_factory=serverless.ServerlessOptions)
    mux: mux.MuxOptions = field(default_factory=mux.MuxOptions)

    def __post_init__(self) -> None:
        if self.drain_s < 0:
            raise ValueError(f"drain_s must be >= 0, got {self.drain_s}")


PolicyBuilder = Callable[[SimContext, SimOptions], Deployment]
POLICIES: dict[str, PolicyBuilder] = {
    "aegaeon": lambda context, options: aegaeon.build(context, options.aegaeon),
    "dedicated": lambda context, options: dedicated.build(context),
    "serverless": lambda context, options: serverless.build(context, options.serverless),
    "mux": lambda context, options: mux.build(context, options.mux),
}


def to_requests(arrivals: Sequence[Arrival], models: ModelSet) -> list[SchedRequest]:
    """The scheduler's requests; output is cut where the model's context ends (as an engine stops)."""
    requests = []
    for index, a in enumerate(arrivals):
        spec = models.specs.get(a.model)
        if spec is None:
            raise ValueError(f"request {index} is for model {a.model!r}, which the simulation does not serve")
        # A prompt filling the context leaves room for one token (the prefill's): the engine refuses
        # longer prompts, so a trace with them is cut to the model's limit.
        prompt = min(a.input_tokens, spec.max_model_len - 1)
        max_tokens = max(min(a.output_tokens, spec.max_model_len - prompt), 1)
        requests.append(SchedRequest(f"r{index}", a.model, a.arrival_s, prompt, max_tokens))
    return requests


def baseline_layout(cluster: ClusterConfig) -> str:
    tp = cluster.tensor_parallel_size
    return f"{cluster.gpus} GPUs" if tp == 1 else f"{cluster.gpus} GPUs as {cluster.engines} TP{tp} engines"


def model_rates(arrivals: Sequence[Arrival], duration_s: float) -> dict[str, float]:
    counts = Counter(a.model for a in arrivals)
    return {model: count / duration_s for model, count in counts.items()}


def simulate(
    policy: str,
    arrivals: Sequence[Arrival],
    models: ModelSet,
    cluster: ClusterConfig,
    scheduler: SchedulerConfig | None = None,
    options: SimOptions | None = None,
) -> SimResult:
    """Run `policy` over the arrivals on `cluster`; every model of the workload must be in `models`."""
    scheduler = scheduler or SchedulerConfig()
    options = options or SimOptions()
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
    if not arrivals:
        raise ValueError("the workload has no requests")
    started = time.perf_counter()
    requests = to_requests(arrivals, models)
    duration = max(trace_duration_s(arrivals), 1e-9)
    loop = EventLoop()
    context = SimContext(loop, models, cluster, scheduler, model_rates(arrivals, duration))
    deployment = POLICIES[policy](context, options)
    for request in requests:
        loop.call_at(request.arrival_s, lambda r=request: deployment.submit(r))
    horizon = loop.run(until=duration + options.drain_s)
    report = slo_report(requests, scheduler, horizon_s=horizon)
    return SimResult(
        policy=policy,
        num_models=len({a.model for a in arrivals}),
        gpus=deployment.gpus,
        layout=cluster.describe() if policy == "aegaeon" else baseline_layout(cluster),
        device=models.device,
        horizon_s=horizon,
        report=report,
        busy_s=deployment.busy_s(),
        notes=deployment.notes(),
        wall_s=time.perf_counter() - started,
        events=loop.events_run,
        requests=requests,
        breakdown=deployment.latency_breakdown(requests),
    )
