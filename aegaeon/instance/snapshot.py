"""A node's state at one moment: what its heartbeat, `/metrics` and `/dashboard` show.

`Node.snapshot()` takes one under the node's lock; readers outside the instance package use nothing
else of the node's state. The per-model totals are running counts the node keeps as requests end, so
they stay exact however few ended requests the node still holds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from aegaeon.config import SLO
from aegaeon.scheduler.decode import kv_bytes_needed
from aegaeon.scheduler.request import SchedRequest
from aegaeon.scheduler.slo import RequestScore
from aegaeon.scheduler.timeline import TimelineTotals

# Torch-free: the api server's process imports this (through serve/metrics) without loading an engine.
if TYPE_CHECKING:
    from aegaeon.instance.instance import Instance
    from aegaeon.instance.node import Node
    from aegaeon.memory.kv_pool import HostKVPoolStats
    from aegaeon.memory.model_cache import ModelCacheStats


@dataclass
class ModelTotals:
    """Counts over the ended requests of one model (a request is counted once, when it ends)."""

    finished: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    slo_met: int = 0  # paper QoS >= the attainment target
    slo_strict: int = 0  # finished, met TTFT and every TBT
    qos_sum: float = 0.0  # paper QoS (scheduler/slo.py)
    stall_score_sum: float = 0.0  # every stall charged

    @property
    def ended(self) -> int:
        return self.finished + self.failed

    def share(self, count: int | float) -> float | None:
        return count / self.ended if self.ended else None

    def add(self, request: SchedRequest, score: RequestScore, target: float) -> None:
        if request.failed:
            self.failed += 1
        else:
            self.finished += 1
        self.prompt_tokens += request.prompt_len
        self.generation_tokens += request.generated
        self.qos_sum += score.qos
        self.stall_score_sum += score.stall_score
        self.slo_met += score.qos >= target
        self.slo_strict += score.strict


@dataclass(frozen=True)
class InstanceSnapshot:
    """One instance as it stands at the moment of reading."""

    name: str
    role: str
    device: str  # the node's devices it owns: "cuda:3", "cuda:0,cuda:1", "cpu:0"
    address: str  # where its engine process listens
    pid: int | None
    up: bool
    arena_bytes: int
    kv_capacity_bytes: int
    # KV of the requests in the instance's decode batches (whole blocks, no lookahead), on the device or
    # swapped out to the host pool between turns: it may exceed the capacity, which bounds one batch.
    kv_used_bytes: int
    waiting: int  # requests queued for prefill here (the running one excluded)
    running: int  # requests in its decode batches
    batches: int
    resident: tuple[str, ...]  # models whose weights were in the arena at the instance's last look
    decode_step_s: float  # seconds inside engine steps of decode turns
    decode_loop_s: float  # seconds in the decode turn loops
    events_held: int  # timeline events held now (bounded)
    events_recorded: int  # timeline events recorded since the instance started
    events: TimelineTotals

    @property
    def kv_usage_ratio(self) -> float:
        return self.kv_used_bytes / self.kv_capacity_bytes if self.kv_capacity_bytes else 0.0


@dataclass(frozen=True)
class ModelSnapshot:
    """One served model: what it is, its SLO, its requests in flight, and its totals since start."""

    name: str
    model_dir: str
    max_model_len: int
    num_parameters: int
    weight_bytes: int
    slo: SLO
    # Requests queued for their prefill, and the rest in flight (prefilling, in transit, decoding).
    waiting: int
    running: int
    totals: ModelTotals


@dataclass(frozen=True)
class NodeSnapshot:
    """The whole node at one moment."""

    now_s: float  # seconds since the node started (the clock of its timelines)
    device: str
    error: str | None  # why the node failed, if it did
    live: int  # requests in flight
    ended_held: int  # ended requests the node still holds (bounded)
    ended_total: int  # requests ended since the node started
    attainment_target: float
    instances: tuple[InstanceSnapshot, ...]
    models: tuple[ModelSnapshot, ...]
    model_cache: ModelCacheStats
    kv_pool: HostKVPoolStats

    def model(self, name: str) -> ModelSnapshot | None:
        return next((model for model in self.models if model.name == name), None)

    def instance(self, name: str) -> InstanceSnapshot | None:
        return next((instance for instance in self.instances if instance.name == name), None)


def read_node(node: Node, model_cache: ModelCacheStats, kv_pool: HostKVPoolStats) -> NodeSnapshot:
    """The snapshot; the caller holds the node's lock (the pools' figures are read under their own)."""
    waiting = dict.fromkeys(node.models, 0)
    for queue in node.prefill.instances:
        for request in queue:
            waiting[request.model] = waiting.get(request.model, 0) + 1
    in_flight = dict.fromkeys(node.models, 0)
    for live in node.live.values():
        in_flight[live.sched.model] = in_flight.get(live.sched.model, 0) + 1
    models = []
    for name, facts in node.models.items():
        models.append(
            ModelSnapshot(
                name=name,
                model_dir=facts.model_dir,
                max_model_len=facts.max_model_len,
                num_parameters=facts.num_parameters,
                weight_bytes=facts.weight_bytes,
                slo=node.config.scheduler.slo(name),
                waiting=waiting[name],
                # Running from the moment a request leaves the prefill queue until it ends.
                running=max(in_flight[name] - waiting[name], 0),
                totals=replace(node.totals.get(name, ModelTotals())),
            )
        )
    return NodeSnapshot(
        now_s=node.now(),
        device=node.config.device,
        error=None if node.error is None else str(node.error),
        live=len(node.live),
        ended_held=len(node.completed),
        ended_total=node.ended_total,
        attainment_target=node.attainment_target,
        instances=tuple(_read_instance(node, instance) for instance in node.instances),
        models=tuple(models),
        model_cache=model_cache,
        kv_pool=kv_pool,
    )


def _read_instance(node: Node, instance: Instance) -> InstanceSnapshot:
    info = instance.engine.info
    decode = instance.decode
    batches = decode.batches if decode is not None else []
    used = sum(kv_bytes_needed(node.specs[b.model], b.requests, 0) for b in batches if b.requests)
    capacity = decode.kv_capacity_bytes if decode is not None else (info.kv_bytes if info else 0)
    timeline = instance.timeline
    return InstanceSnapshot(
        name=instance.instance_name,
        role=instance.role,
        device=",".join(instance.engine.spec.devices) or (info.device if info else ""),
        address=instance.engine.spec.address,
        pid=info.pid if info else None,
        up=instance.is_alive() and instance.error is None and instance.engine.alive,
        arena_bytes=info.arena_bytes if info else 0,
        kv_capacity_bytes=capacity,
        kv_used_bytes=used,
        waiting=len(instance.prefill_queue) if instance.prefill_queue is not None else 0,
        running=sum(len(b) for b in batches),
        batches=len(batches),
        resident=tuple(instance.resident),
        decode_step_s=instance.decode_step_s,
        decode_loop_s=instance.decode_loop_s,
        events_held=len(timeline),
        events_recorded=timeline.recorded,
        events=timeline.totals(),
    )
