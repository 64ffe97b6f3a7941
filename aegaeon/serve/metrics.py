"""Prometheus metrics of one node, read from the node itself when they are scraped.

The node is where the truth is. A scrape reads it through its read API only: `Node.snapshot()` (each
instance's scheduler state and timeline totals, each model's requests in flight and running totals, the
shared host pools), the requests that ended since the previous scrape (`Node.ended_since`, by cursor)
and the timeline events recorded since then (`Timeline.since`). The counters come from the node's
running totals, so they stay exact; the latency histograms are fed from the bounded histories, so they
see every request while scrapes come more often than the node's `ended_history` requests end. Nothing
here hooks into the serving path: an idle node costs nothing, and serving never waits on metrics.

Each `NodeMetrics` has its own registry (never prometheus_client's global one): one process may hold
several nodes (tests do), and a registry must not see two nodes' series under the same names.

The per-instance label is `instance_name`, not `instance`: Prometheus attaches its own `instance`
label (the scraped target) to every series, and a clash would rename ours to `exported_instance`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from aegaeon.instance.snapshot import ModelSnapshot, NodeSnapshot
from aegaeon.scheduler.request import SchedRequest
from aegaeon.scheduler.timeline import EventKind

if TYPE_CHECKING:
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


class NodeMetrics:
    """The Prometheus view of one node: `registry` holds one collector that reads the node at scrape time."""

    def __init__(self, node: Node):
        self.node = node
        first = node.snapshot()
        self.target = first.attainment_target
        self.registry = CollectorRegistry(auto_describe=False)
        # One scrape ingests at a time: /metrics and /dashboard/data may be read concurrently.
        self._lock = threading.Lock()
        self._ended_cursor = 0
        self._event_cursors: dict[str, int] = {}
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
        for model in first.models:
            self.ttft.labels(model.name)
            self.tbt.labels(model.name)
        for instance in first.instances:
            for kind in SWITCH_KINDS:
                self.switch_latency.labels(instance.name, kind)
        self.registry.register(_NodeCollector(self))

    def update(self) -> NodeSnapshot:
        """Feed the histograms what ended and was recorded since the last update; then the node's snapshot."""
        with self._lock:
            ended, self._ended_cursor = self.node.ended_since(self._ended_cursor)
            for request in ended:
                self._observe_request(request)
            for name, timeline in self.node.timelines().items():
                events, self._event_cursors[name] = timeline.since(self._event_cursors.get(name, 0))
                for event in events:
                    if event.kind == EventKind.SWITCH:
                        self.switch_latency.labels(name, event.detail).observe(event.duration_s)
        return self.node.snapshot()

    def _observe_request(self, request: SchedRequest) -> None:
        times = request.token_times
        if times:
            self.ttft.labels(request.model).observe(times[0] - request.arrival_s)
        tbt = self.tbt.labels(request.model)
        for previous, current in zip(times[:-1], times[1:], strict=True):
            tbt.observe(current - previous)


class _NodeCollector(Collector):
    """Reads the node on every scrape of the registry."""

    def __init__(self, metrics: NodeMetrics):
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # nothing to describe up front: the series depend on what the node serves

    def collect(self) -> Iterator[Metric]:
        metrics = self.metrics
        snapshot = metrics.update()
        yield from _model_families(snapshot.models)
        yield from metrics.ttft.collect()
        yield from metrics.tbt.collect()
        yield from _instance_families(snapshot)
        yield from metrics.switch_latency.collect()
        yield from _node_families(snapshot)


def _model_families(models: tuple[ModelSnapshot, ...]) -> Iterator[Metric]:
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
        "Ended requests whose paper QoS score reached the target.",
        labels=["model"],
    )
    strict = CounterMetricFamily(
        f"{PREFIX}slo_strict_requests",
        "Ended requests that finished, met TTFT and kept every gap between tokens within TBT.",
        labels=["model"],
    )
    attainment = GaugeMetricFamily(
        f"{PREFIX}slo_attainment_ratio",
        "The paper's SLO attainment: mean QoS score of the requests ended since start.",
        labels=["model"],
    )
    strict_ratio = GaugeMetricFamily(
        f"{PREFIX}slo_strict_attainment_ratio",
        "Share of the requests ended since start that met TTFT and every TBT.",
        labels=["model"],
    )
    stall_attainment = GaugeMetricFamily(
        f"{PREFIX}slo_stall_attainment_ratio",
        "Mean every-stall-charged score (share of lifetime not late) of the requests ended since start.",
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
    for snapshot in sorted(models, key=lambda m: m.name):
        model, totals = snapshot.name, snapshot.totals
        requests.add_metric([model, FINISHED], totals.finished)
        requests.add_metric([model, FAILED], totals.failed)
        prompt.add_metric([model], totals.prompt_tokens)
        generation.add_metric([model], totals.generation_tokens)
        met.add_metric([model], totals.slo_met)
        strict.add_metric([model], totals.slo_strict)
        # With nothing ended yet there is no ratio: the series is left out rather than shown as 0 or 1.
        if totals.ended:
            attainment.add_metric([model], totals.share(totals.qos_sum))
            strict_ratio.add_metric([model], totals.share(totals.slo_strict))
            stall_attainment.add_metric([model], totals.share(totals.stall_score_sum))
        ttft_target.add_metric([model], snapshot.slo.ttft_s)
        tbt_target.add_metric([model], snapshot.slo.tbt_s)
        waiting.add_metric([model], snapshot.waiting)
        running.add_metric([model], snapshot.running)
        weights.add_metric([model], snapshot.weight_bytes)
    yield from (requests, prompt, generation, met, strict, attainment, strict_ratio, stall_attainment)
    yield from (ttft_target, tbt_target, waiting, running, weights)


def _instance_families(snapshot: NodeSnapshot) -> Iterator[Metric]:
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
    events_held = GaugeMetricFamily(
        f"{PREFIX}instance_timeline_events",
        "Timeline events the instance holds now (its newest; bounded by timeline_events).",
        labels=labels,
    )
    models = [model.name for model in snapshot.models]
    for state in snapshot.instances:
        name = [state.name]
        info.add_metric([*name, state.role, state.device], 1)
        up.add_metric(name, int(state.up))
        counts = state.events
        # Every (model, kind) switch series and every busy kind exists from the start, at 0.
        switch_counts = {(m, k): 0 for m in models for k in SWITCH_KINDS} | counts.switches
        for (model, kind), count in sorted(switch_counts.items()):
            switches.add_metric([*name, model, kind], count)
        prefetches.add_metric(name, counts.count.get(EventKind.PREFETCH, 0))
        restarts.add_metric(name, counts.count.get(EventKind.RESTART, 0))
        for kind in BUSY_KINDS:
            busy.add_metric([*name, kind.value], counts.seconds.get(kind, 0.0))
        step.add_metric(name, state.decode_step_s)
        loop.add_metric(name, state.decode_loop_s)
        for model in models:
            resident.add_metric([*name, model], int(model in state.resident))
        resident_count.add_metric(name, len(state.resident))
        arena.add_metric(name, state.arena_bytes)
        kv_capacity.add_metric(name, state.kv_capacity_bytes)
        kv_used.add_metric(name, state.kv_used_bytes)
        kv_ratio.add_metric(name, state.kv_usage_ratio)
        waiting.add_metric(name, state.waiting)
        running.add_metric(name, state.running)
        batches.add_metric(name, state.batches)
        events_held.add_metric(name, state.events_held)
    yield from (info, up, switches, prefetches, restarts, busy, step, loop, resident, resident_count)
    yield from (arena, kv_capacity, kv_used, kv_ratio, waiting, running, batches, events_held)


def _node_families(snapshot: NodeSnapshot) -> Iterator[Metric]:
    cache, pool = snapshot.model_cache, snapshot.kv_pool
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
    yield CounterMetricFamily(
        f"{PREFIX}host_model_cache_disk_loads",
        "Models read from disk into the host model cache.",
        value=cache.disk_loads,
    )
    yield CounterMetricFamily(
        f"{PREFIX}host_model_cache_loaded_bytes",
        "Bytes read from disk into the host model cache.",
        value=cache.loaded_bytes,
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
        f"{PREFIX}node_uptime_seconds", "Seconds since the node started.", value=snapshot.now_s
    )
    yield GaugeMetricFamily(
        f"{PREFIX}node_requests_in_flight", "Requests in flight on the node.", value=snapshot.live
    )
    yield GaugeMetricFamily(
        f"{PREFIX}node_ended_requests_held",
        "Ended requests the node holds now (its newest; bounded by ended_history).",
        value=snapshot.ended_held,
    )


def render(registry: CollectorRegistry, accept: str | None = None) -> tuple[bytes, str]:
    """The registry in the exposition format the scraper asked for (`Accept`), and its content type."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
