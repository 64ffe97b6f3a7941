"""aegaeon: token-level scheduling, the scheduler package driven unchanged by simulated instances.

Each node mirrors aegaeon/instance/node.py: a grouped-FCFS `PrefillDispatcher` over its prefill
(or colocated) instances, a `DecodeDispatcher` over its decode (or colocated) instances, and the KV
handoff from one to the other through the node's host pool. Models are placed on nodes once, the
heaviest first onto the least-loaded node (a router sends each model's requests to its node).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from aegaeon.config import SchedulerConfig
from aegaeon.scheduler.decode import DecodeDispatcher, DecodeInstance
from aegaeon.scheduler.prefill import PrefillDispatcher, PrefillQueue
from aegaeon.scheduler.request import SchedRequest
from aegaeon.scheduler.timeline import Timeline
from aegaeon.scheduler.turn_loop import COLOCATED, DECODE, PREFILL
from aegaeon.sim.breakdown import LatencyBreakdown
from aegaeon.sim.cluster import ClusterConfig, DeviceMemory, NodeLayout
from aegaeon.sim.device import ResidentWeights, SlotWeights
from aegaeon.sim.events import EventLoop, Process, Signal
from aegaeon.sim.models import ModelSet
from aegaeon.sim.policies.aegaeon_instance import Handoff, SimInstance
from aegaeon.sim.policies.base import Deployment, SimContext, model_load

# "engine": the live engine's arena (aegaeon.memory.loader): each model leaves room for the largest
# beside it (aegaeon.memory.placement), most recently used evicted.
# "slots": fixed slots of the largest model's size, least recently used replaced.
ARENA_KINDS = ("engine", "slots")


@dataclass(frozen=True)
class AegaeonOptions:
    arena: str = "engine"

    def __post_init__(self) -> None:
        if self.arena not in ARENA_KINDS:
            raise ValueError(f"arena must be one of {ARENA_KINDS}, got {self.arena!r}")


class SimNode:
    """The instances of one simulated machine and the two dispatchers that feed them."""

    def __init__(
        self,
        name: str,
        layout: NodeLayout,
        loop: EventLoop,
        models: ModelSet,
        scheduler: SchedulerConfig,
        memory: DeviceMemory,
        max_batch_size: int,
        options: AegaeonOptions = AegaeonOptions(),
        breakdown: LatencyBreakdown | None = None,
    ) -> None:
        self.name = name
        self.loop = loop
        self.models = models
        self.work = Signal(loop)
        roles = (
            [COLOCATED] * layout.colocated
            if layout.colocated
            else [PREFILL] * layout.prefill + [DECODE] * layout.decode
        )
        self.instances: list[SimInstance] = []
        for index, role in enumerate(roles):
            instance_name = f"{name}/{role}-{index}"
            queue = PrefillQueue(instance_name, models.planner, scheduler) if role != DECODE else None
            decode = (
                DecodeInstance(
                    instance_name, memory.kv_bytes, models.specs, models.planner, scheduler, max_batch_size
                )
                if role != PREFILL
                else None
            )
            if options.arena == "slots":
                weights = SlotWeights(
                    memory.weight_bytes,
                    models.weight_bytes,
                    models.predictor.switch_s,
                    models.largest_weight_bytes(),
                )
            else:
                weights = ResidentWeights(
                    memory.weight_bytes,
                    models.weight_bytes,
                    models.predictor.switch_s,
                    largest_bytes=models.largest_weight_bytes(),
                )
            self.instances.append(SimInstance(instance_name, role, self, queue, decode, weights, breakdown))
        self.prefill = PrefillDispatcher(
            [i.prefill_queue for i in self.instances if i.prefill_queue is not None], scheduler
        )
        self._decoders = [i for i in self.instances if i.decode is not None]
        self.decode = DecodeDispatcher([i.decode for i in self._decoders])

    def start(self) -> None:
        for instance in self.instances:
            self.loop.spawn(instance.run())

    def submit(self, request: SchedRequest) -> None:
        self.prefill.submit(request)
        self.prefill.dispatch(self.loop.now)
        self.work.notify_all()

    def after_prefill(self, request: SchedRequest, instance: SimInstance) -> Process:
        """Place a prefilled request in a decode batch; its KV goes through the host pool if elsewhere."""
        now = self.loop.now
        placement = self.decode.dispatch(request)
        if placement is None:  # fits no decode instance even alone: the live node fails it too
            instance.on_device.pop(request, None)
            request.fail(now)
            return
        target = self._decoders[placement.instance]
        if target is instance:
            return
        seconds = instance.export(request)
        target.inbox.append(Handoff(request, now + seconds))
        self.work.notify_all()
        if seconds > 0:
            # The live node exports under its lock: the prefill instance waits for the copy.
            yield now + seconds

    def timelines(self) -> dict[str, Timeline]:
        return {i.name: i.timeline for i in self.instances}


def place_models(models: ModelSet, rates: dict[str, float], nodes: int) -> dict[str, int]:
    """Each model's node: heaviest first onto the node with the least load so far (ties: lowest index)."""
    totals = [0.0] * nodes
    placement = {}
    for model in sorted(models, key=lambda m: (-model_load(models, rates, m), m)):
        index = min(range(nodes), key=lambda i: (totals[i], i))
        placement[model] = index
        totals[index] += model_load(models, rates, model)
    return placement


class AegaeonDeployment(Deployment):
    def __init__(self, context: SimContext, options: AegaeonOptions = AegaeonOptions()) -> None:
        cluster: ClusterConfig = context.cluster
        memory = cluster.memory.aegaeon_split(context.models.largest_weight_bytes())
        self.breakdown = LatencyBreakdown()
        self.nodes: Sequence[SimNode] = [
            SimNode(
                f"node{index}",
                layout,
                context.loop,
                context.models,
                context.scheduler,
                memory,
                cluster.max_batch_size,
                options,
                self.breakdown,
            )
            for index, layout in enumerate(cluster.nodes)
        ]
        self._node_of = place_models(context.models, dict(context.rates), len(self.nodes))
        self._gpus = cluster.gpus
        self._tp = cluster.tensor_parallel_size
        for node in self.nodes:
            node.start()

    def submit(self, request: SchedRequest) -> None:
        self.nodes[self._node_of[request.model]].submit(request)

    def busy_s(self) -> dict[str, float]:
        totals: dict[str, float] = defaultdict(float)
        for node in self.nodes:
            for instance in node.instances:
                for kind, seconds in instance.busy_s.items():
                    totals[kind] += seconds * self._tp
        return dict(totals)

    @property
    def gpus(self) -> int:
        return self._gpus

    def timelines(self) -> dict[str, Timeline]:
        return {name: t for node in self.nodes for name, t in node.timelines().items()}

    def latency_breakdown(self, requests: Sequence[SchedRequest]) -> dict[str, float]:
        return self.breakdown.mean(requests)

    def notes(self) -> dict:
        models_per_node = [sum(1 for n in self._node_of.values() if n == i) for i in range(len(self.nodes))]
        switches = sum(
            1
            for t in self.timelines().values()
            for e in t.events
            if e.kind.value == "switch" and e.detail == "loaded"
        )
        return {"models_per_node": models_per_node, "weight_loads": switches}


def build(context: SimContext, options: AegaeonOptions = AegaeonOptions()) -> AegaeonDeployment:
    return AegaeonDeployment(context, options)
