"""Prometheus metrics of one node, read from the node itself when they are scraped.

The node is where the truth is: its finished and failed requests (`node.completed`), the requests in
flight (`node.live`), each instance's scheduler state and timeline, and the shared host pools. Nothing
here hooks into the serving path: a scrape takes the node's lock for a moment, copies what it needs,
and feeds what happened since the previous scrape (newly ended requests, new timeline events) into
counters and histograms. So an idle node costs nothing, and serving never waits on metrics.

Each `NodeMetrics` has its own registry (never prometheus_client's global one): one process may hold
several nodes (tests do), and a registry must not see two nodes' series under the same names.

The per-instance label is `instance_name`, not `instance`: Prometheus attaches its own `instance`
label (the scraped target) to every series, and a clash would rename ours to `exported_instance`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from aegaeon.config import DEFAULT_ATTAINMENT_TARGET
from aegaeon.scheduler.decode import kv_bytes_needed
from aegaeon.scheduler.request import SchedRequest
from aegaeon.scheduler.slo import request_score
from aegaeon.scheduler.timeline import EventKind, TimelineEvent

if TYPE_CHECKING:
    from aegaeon.instance.instance import Instance
    from aegaeon.instance.node import Node

PREFIX = "aegaeon_"
FINISHED, FAILED = "finished", "failed"
OUTCOMES = (FINISHED, FAILED)
# Switch events record whether weights were copied ("loaded") or the model was already in the arena.
SWITCH_KINDS = ("loaded", "resident")
# Timeline kinds whose seconds count as the instance being busy, pre-declared so their series exist
# (at 0) before the first event: rate() over a series that appears late misses its first increase.
BUSY_KINDS = (
    EventKind.PREFILL,
    EventKind.DECODE_TURN,
    EventKind.SWITCH,
    EventKind.SWAP_IN,
    EventKind.SWAP_OUT,
)

# Bucket bounds include the default SLO targets (TTFT 10 s, TBT 100 ms), so `le="10"` / `le="0.1"` count
# the requests / gaps within them. TBT gaps reach seconds when a batch waits out other models' turns.
TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
TBT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
# A switch is a pointer change (resident model) up to a full weight copy (seconds for big models on PCIe).
SWITCH_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


# -- what the node holds now -------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceState:
    """One instance as it stands at the moment of reading."""

    name: str
    role: str
    device: str
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

    @property
    def kv_usage_ratio(self) -> float:
        return self.kv_used_bytes / self.kv_capacity_bytes if self.kv_capacity_bytes else 0.0


@dataclass(frozen=True)
class ModelLoad:
    """A model's requests in flight: queued for their prefill, and the rest (prefilling or decoding)."""

    waiting: int = 0
    running: int = 0


def read_instances(node: Node) -> list[InstanceState]:
    """Every instance of the node, read under the node's lock."""
    with node.lock:
        return [_instance_state(node, instance) for instance in node.instances]


def _instance_state(node: Node, instance: Instance) -> InstanceState:
    info = instance.engine.info
    decode = instance.decode
    batches = decode.batches if decode is not None else []
    used = sum(kv_bytes_needed(node.specs[b.model], b.requests, 0) for b in batches if b.requests)
    capacity = decode.kv_capacity_bytes if decode is not None else (info.kv_bytes if info else 0)
    return InstanceState(
        name=instance.instance_name,
        role=instance.role,
        device=info.device if info else "",
        pid=info.pid if info else None,
        up=instance.is_alive() and instance.error is None and instance.engine.alive,
        arena_bytes=info.arena_bytes if info else 0,
        kv_capacity_bytes=capacity,
        kv_used_bytes=used,
        waiting=len(instance.prefill_queue) if instance.prefill_queue is not None else 0,
        running=sum(len(b) for b in batches),
        batches=len(batches),
        resident=tuple(instance.resident),
    )


def read_model_load(node: Node) -> dict[str, ModelLoad]:
    """Per served model, its requests waiting for a prefill and running, read under the node's lock."""
    with node.lock:
        waiting = dict.fromkeys(node.models, 0)
        for queue in node.prefill.instances:
            for request in queue:
                waiting[request.model] = waiting.get(request.model, 0) + 1
        in_flight = dict.fromkeys(node.models, 0)
        for live in node.live.values():
            in_flight[live.sched.model] = in_flight.get(live.sched.model, 0) + 1
    # A request counts as running from the moment it leaves the prefill queue (prefilling, in transit
    # to a decode instance, decoding) until it ends.
    return {
        model: ModelLoad(waiting[model], max(in_flight.get(model, 0) - waiting[model], 0))
        for model in {**waiting, **in_flight}
    }


# -- what happened since the node started ---------------------------------------------------------------


@dataclass
class ModelTotals:
    """Counts over the ended requests of one model (a request is counted once, when it ends)."""

    finished: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    slo_met: int = 0  # score >= the attainment target
    slo_strict: int = 0  # finished, met TTFT and every TBT
    score_sum: float = 0.0

    @property
    def ended(self) -> int:
        return self.finished + self.failed

    def share(self, count: int | float) -> float | None:
        return count / self.ended if self.ended else None


@dataclass
class InstanceTotals:
    """Counts over one instance's timeline."""

    switches: dict[tuple[str, str], int] = field(default_factory=dict)  # (model, loaded|resident) -> count
    busy_s: dict[str, float] = field(default_factory=lambda: {kind.value: 0.0 for kind in BUSY_KINDS})
    prefetches: int = 0
    restarts: int = 0


class NodeMetrics:
    """The Prometheus view of one node: `registry` holds one collector that reads the node at scrape time."""

    def __init__(self, node: Node, target: float = DEFAULT_ATTAINMENT_TARGET):
        self.node = node
        self.target = target
        self.registry = CollectorRegistry(auto_describe=False)
        # One scrape ingests at a time: /metrics and /dashboard/data may be read concurrently.
        self._lock = threading.Lock()
        self._completed_seen = 0
        self._events_seen: dict[str, int] = {}
        self.models: dict[str, ModelTotals] = {model: ModelTotals() for model in node.models}
        # Every (model, kind) switch series exists from the start, at 0, like the busy kinds.
        self.instances: dict[str, InstanceTotals] = {
            i.instance_name: InstanceTotals(switches={(m, k): 0 for m in node.models for k in SWITCH_KINDS})
            for i in node.instances
        }
        # Not registered anywhere: the collector below yields them after feeding them.
        self.ttft = Histogram(
            f"{PREFIX}time_to_first_token_seconds",
            "Seconds from a request's arrival at the node to its first token, by model.",
            ["model"],
            buckets=TTFT_BUCKETS_S,
            registry=None,
        )
        self.tbt = Histogram(
            f"{PREFIX}time_between_tokens_seconds",
            "Seconds between consecutive output tokens of a request, by model.",
            ["model"],
            buckets=TBT_BUCKETS_S,
            registry=None,
        )
        self.switch_latency = Histogram(
            f"{PREFIX}switch_duration_seconds",
            "Seconds an instance took to switch its active model (loaded: weights copied; resident: not).",
            ["instance_name", "switch"],
            buckets=SWITCH_BUCKETS_S,
            registry=None,
        )
        for model in node.models:
            self.ttft.labels(model)
            self.tbt.labels(model)
        for name in self.instances:
            for kind in SWITCH_KINDS:
                self.switch_latency.labels(name, kind)
        self.registry.register(_NodeCollector(self))

    def update(self) -> None:
        """Feed the requests that ended and the timeline events recorded since the last update."""
        node = self.node
        with self._lock:
            with node.lock:
                if len(node.completed) < self._completed_seen:  # the list was trimmed: start over from there
                    self._completed_seen = len(node.completed)
                ended = node.completed[self._completed_seen :]
                self._completed_seen += len(ended)
            for request in ended:
                self._ingest_request(request)
            for instance in node.instances:
                events = instance.timeline.events
                # The instance thread appends while we read: take a length, then only what lies before it.
                seen, count = self._events_seen.get(instance.instance_name, 0), len(events)
                totals = self.instances.setdefault(instance.instance_name, InstanceTotals())
                for event in events[seen:count]:
                    self._ingest_event(totals, event)
                self._events_seen[instance.instance_name] = count

    def snapshot(self) -> tuple[dict[str, ModelTotals], dict[str, InstanceTotals]]:
        """Copies of the totals, after an update."""
        self.update()
        with self._lock:
            models = {name: replace(totals) for name, totals in self.models.items()}
            instances = {
                name: replace(t, switches=dict(t.switches), busy_s=dict(t.busy_s))
                for name, t in self.instances.items()
            }
        return models, instances

    def _ingest_request(self, request: SchedRequest) -> None:
        totals = self.models.setdefault(request.model, ModelTotals())
        if request.failed:
            totals.failed += 1
        else:
            totals.finished += 1
        totals.prompt_tokens += request.prompt_len
        totals.generation_tokens += request.generated
        score = request_score(request, self.node.config.scheduler.slo(request.model))
        totals.score_sum += score.score
        totals.slo_met += score.score >= self.target
        totals.slo_strict += score.strict
        times = request.token_times
        if times:
            self.ttft.labels(request.model).observe(times[0] - request.arrival_s)
        tbt = self.tbt.labels(request.model)
        for previous, current in zip(times[:-1], times[1:], strict=True):
            tbt.observe(current - previous)

    def _ingest_event(self, totals: InstanceTotals, event: TimelineEvent) -> None:
        if event.kind == EventKind.SWITCH:
            key = (event.model or "", event.detail)
            totals.switches[key] = totals.switches.get(key, 0) + 1
            self.switch_latency.labels(event.instance, event.detail).observe(event.duration_s)
        elif event.kind == EventKind.PREFETCH:
            totals.prefetches += 1
        elif event.kind == EventKind.RESTART:
            totals.restarts += 1
        if event.kind in BUSY_KINDS:
            totals.busy_s[event.kind.value] = totals.busy_s.get(event.kind.value, 0.0) + event.duration_s


class _NodeCollector(Collector):
    """Reads the node on every scrape of the registry."""

    def __init__(self, metrics: NodeMetrics):
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # nothing to describe up front: the series depend on what the node serves

    def collect(self) -> Iterator[Metric]:
        metrics = self.metrics
        models, instances = metrics.snapshot()
        yield from _model_families(metrics.node, models, read_model_load(metrics.node))
        yield from metrics.ttft.collect()
        yield from metrics.tbt.collect()
        yield from _instance_families(metrics.node, read_instances(metrics.node), instances)
        yield from metrics.switch_latency.collect()
        yield from _node_families(metrics.node)


def _model_families(
    node: Node, models: dict[str, ModelTotals], load: dict[str, ModelLoad]
) -> Iterator[Metric]:
    requests = CounterMetricFamily(
        f"{PREFIX}requests", "Requests that ended, by model and outcome.", labels=["model", "outcome"]
    )
    prompt = CounterMetricFamily(
        f"{PREFIX}prompt_tokens", "Prompt tokens of the requests that ended.", labels=["model"]
    )
    generation = CounterMetricFamily(
        f"{PREFIX}generation_tokens", "Output tokens of the requests that ended.", labels=["model"]
    )
    met = CounterMetricFamily(
        f"{PREFIX}slo_met_requests",
        "Ended requests whose SLO score (share of lifetime within deadlines) reached the target.",
        labels=["model"],
    )
    strict = CounterMetricFamily(
        f"{PREFIX}slo_strict_requests",
        "Ended requests that finished, met TTFT and kept every gap between tokens within TBT.",
        labels=["model"],
    )
    attainment = GaugeMetricFamily(
        f"{PREFIX}slo_attainment_ratio",
        "Share of the requests ended since start whose SLO score reached the target.",
        labels=["model"],
    )
    strict_ratio = GaugeMetricFamily(
        f"{PREFIX}slo_strict_attainment_ratio",
        "Share of the requests ended since start that met TTFT and every TBT.",
        labels=["model"],
    )
    mean_score = GaugeMetricFamily(
        f"{PREFIX}slo_mean_score_ratio",
        "Mean SLO score (share of lifetime within deadlines) of the requests ended since start.",
        labels=["model"],
    )
    ttft_target = GaugeMetricFamily(
        f"{PREFIX}slo_ttft_target_seconds", "The model's time-to-first-token target.", labels=["model"]
    )
    tbt_target = GaugeMetricFamily(
        f"{PREFIX}slo_tbt_target_seconds", "The model's time-between-tokens target.", labels=["model"]
    )
    waiting = GaugeMetricFamily(
        f"{PREFIX}requests_waiting", "Requests queued for their prefill.", labels=["model"]
    )
    running = GaugeMetricFamily(
        f"{PREFIX}requests_running",
        "Requests in flight past the prefill queue (prefilling or decoding).",
        labels=["model"],
    )
    weights = GaugeMetricFamily(
        f"{PREFIX}model_weight_bytes", "Bytes of the model's weights.", labels=["model"]
    )
    for model in sorted({*models, *load}):
        totals = models.get(model, ModelTotals())
        requests.add_metric([model, FINISHED], totals.finished)
        requests.add_metric([model, FAILED], totals.failed)
        prompt.add_metric([model], totals.prompt_tokens)
        generation.add_metric([model], totals.generation_tokens)
        met.add_metric([model], totals.slo_met)
        strict.add_metric([model], totals.slo_strict)
        # With nothing ended yet there is no ratio: the series is left out rather than shown as 0 or 1.
        if totals.ended:
            attainment.add_metric([model], totals.share(totals.slo_met))
            strict_ratio.add_metric([model], totals.share(totals.slo_strict))
            mean_score.add_metric([model], totals.share(totals.score_sum))
        slo = node.config.scheduler.slo(model)
        ttft_target.add_metric([model], slo.ttft_s)
        tbt_target.add_metric([model], slo.tbt_s)
        now = load.get(model, ModelLoad())
        waiting.add_metric([model], now.waiting)
        running.add_metric([model], now.running)
        if model in node.models:
            weights.add_metric([model], node.models[model].weight_bytes)
    yield from (requests, prompt, generation, met, strict, attainment, strict_ratio, mean_score)
    yield from (ttft_target, tbt_target, waiting, running, weights)


def _instance_families(
    node: Node, states: list[InstanceState], totals: dict[str, InstanceTotals]
) -> Iterator[Metric]:
    labels = ["instance_name"]
    info = GaugeMetricFamily(
        f"{PREFIX}instance_info",
        "An instance: its role and device (value 1).",
        labels=[*labels, "role", "device"],
    )
    up = GaugeMetricFamily(
        f"{PREFIX}instance_up", "1 while the instance's loop and process run.", labels=labels
    )
    switches = CounterMetricFamily(
        f"{PREFIX}switches",
        "Model switches, by target model and whether weights were copied (loaded) or already resident.",
        labels=[*labels, "model", "switch"],
    )
    prefetches = CounterMetricFamily(
        f"{PREFIX}prefetches", "Prefetches of the next model's weights started.", labels=labels
    )
    restarts = CounterMetricFamily(f"{PREFIX}instance_restarts", "Instance process restarts.", labels=labels)
    busy = CounterMetricFamily(
        f"{PREFIX}instance_busy_seconds",
        "Seconds the instance spent in each kind of work (prefill, decode_turn, switch, swap_in, swap_out).",
        labels=[*labels, "kind"],
    )
    step = CounterMetricFamily(
        f"{PREFIX}instance_decode_step_seconds",
        "Seconds inside the engine's decode steps (the rest of decode_loop is scheduling overhead).",
        labels=labels,
    )
    loop = CounterMetricFamily(
        f"{PREFIX}instance_decode_loop_seconds", "Seconds in the decode turn loops.", labels=labels
    )
    resident = GaugeMetricFamily(
        f"{PREFIX}instance_model_resident",
        "1 if the model's weights are in the instance's device arena.",
        labels=[*labels, "model"],
    )
    resident_count = GaugeMetricFamily(
        f"{PREFIX}instance_resident_models", "Models whose weights are in the device arena.", labels=labels
    )
    arena = GaugeMetricFamily(f"{PREFIX}instance_arena_bytes", "Bytes of the device arena.", labels=labels)
    kv_capacity = GaugeMetricFamily(
        f"{PREFIX}instance_kv_capacity_bytes", "Bytes of device KV memory (bounds one batch).", labels=labels
    )
    kv_used = GaugeMetricFamily(
        f"{PREFIX}instance_kv_used_bytes",
        "KV bytes held by the requests of the instance's decode batches (device or swapped out).",
        labels=labels,
    )
    kv_ratio = GaugeMetricFamily(
        f"{PREFIX}instance_kv_usage_ratio",
        "instance_kv_used_bytes / instance_kv_capacity_bytes.",
        labels=labels,
    )
    waiting = GaugeMetricFamily(
        f"{PREFIX}instance_requests_waiting", "Requests in the instance's prefill queue.", labels=labels
    )
    running = GaugeMetricFamily(
        f"{PREFIX}instance_requests_running", "Requests in the instance's decode batches.", labels=labels
    )
    batches = GaugeMetricFamily(f"{PREFIX}instance_decode_batches", "Decode batches held.", labels=labels)
    by_name = {instance.instance_name: instance for instance in node.instances}
    for state in states:
        name = [state.name]
        info.add_metric([*name, state.role, state.device], 1)
        up.add_metric(name, int(state.up))
        counts = totals.get(state.name, InstanceTotals())
        for (model, kind), count in sorted(counts.switches.items()):
            switches.add_metric([*name, model, kind], count)
        prefetches.add_metric(name, counts.prefetches)
        restarts.add_metric(name, counts.restarts)
        for kind, seconds in sorted(counts.busy_s.items()):
            busy.add_metric([*name, kind], seconds)
        instance = by_name.get(state.name)
        if instance is not None:
            step.add_metric(name, instance.decode_step_s)
            loop.add_metric(name, instance.decode_loop_s)
        for model in node.models:
            resident.add_metric([*name, model], int(model in state.resident))
        resident_count.add_metric(name, len(state.resident))
        arena.add_metric(name, state.arena_bytes)
        kv_capacity.add_metric(name, state.kv_capacity_bytes)
        kv_used.add_metric(name, state.kv_used_bytes)
        kv_ratio.add_metric(name, state.kv_usage_ratio)
        waiting.add_metric(name, state.waiting)
        running.add_metric(name, state.running)
        batches.add_metric(name, state.batches)
    yield from (info, up, switches, prefetches, restarts, busy, step, loop, resident, resident_count)
    yield from (arena, kv_capacity, kv_used, kv_ratio, waiting, running, batches)


def _node_families(node: Node) -> Iterator[Metric]:
    cache = node.model_cache.stats()
    pool = node.kv_pool.stats()
    yield GaugeMetricFamily(
        f"{PREFIX}host_model_cache_capacity_bytes",
        "Bytes of the node's host model cache.",
        value=cache.capacity,
    )
    yield GaugeMetricFamily(
        f"{PREFIX}host_model_cache_used_bytes",
        "Bytes of the models in the host model cache.",
        value=cache.used,
    )
    yield GaugeMetricFamily(
        f"{PREFIX}host_model_cache_models", "Models in the host model cache.", value=cache.models
    )
    yield CounterMetricFamily(
        f"{PREFIX}host_model_cache_evictions",
        "Models evicted from the host model cache to make room.",
        value=cache.evictions,
    )
    yield GaugeMetricFamily(
        f"{PREFIX}host_kv_pool_capacity_bytes", "Bytes of the node's host KV pool.", value=pool.capacity_bytes
    )
    yield GaugeMetricFamily(
        f"{PREFIX}host_kv_pool_allocated_bytes",
        "Bytes of the KV blocks allocated in the host KV pool.",
        value=pool.allocated_bytes,
    )
    slabs = GaugeMetricFamily(
        f"{PREFIX}host_kv_pool_slabs", "Slabs of the host KV pool, in use or free.", labels=["state"]
    )
    slabs.add_metric(["in_use"], pool.slabs_in_use)
    slabs.add_metric(["free"], pool.slabs_free)
    yield slabs
    yield GaugeMetricFamily(
        f"{PREFIX}node_uptime_seconds", "Seconds since the node started.", value=node.now()
    )


def render(registry: CollectorRegistry, accept: str | None = None) -> tuple[bytes, str]:
    """The registry in the exposition format the scraper asked for (`Accept`), and its content type."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
