"""A node that runs for a long time holds bounded histories, while its counters stay exact.

An operator sees: past `ended_history` requests and `timeline_events` events the node holds no more of
them (its memory stops growing), and `/metrics` still counts every request and every switch.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from aegaeon.config import MIB, EngineConfig, MemoryConfig, NodeConfig, SchedulerConfig
from aegaeon.instance.node import Node
from aegaeon.scheduler.timeline import EventKind
from aegaeon.serve.metrics import NodeMetrics, render
from tests.serve.test_metrics import KV_BYTES, MODELS, RELAXED_SLO, WEIGHT_BYTES, submit_all, workload

ENDED_HISTORY = 5
TIMELINE_EVENTS = 16
REQUESTS_PER_MODEL = 4
OUTPUT_TOKENS = 6


def test_histories_are_bounded_and_counters_exact(five_model_dirs, profile_path):
    config = NodeConfig(
        profile_path=str(profile_path),
        scheduler=SchedulerConfig(default_slo=RELAXED_SLO),
        engine=EngineConfig(kv_cache_bytes=KV_BYTES),
        memory=MemoryConfig(
            cpu_arena_bytes=KV_BYTES + WEIGHT_BYTES, host_kv_pool_bytes=64 * MIB, kv_slab_bytes=4 * MIB
        ),
        ended_history=ENDED_HISTORY,
        timeline_events=TIMELINE_EVENTS,
    )
    with Node({m: five_model_dirs[m] for m in MODELS}, config, progress=False) as node:
        metrics = NodeMetrics(node)
        requests = workload(seed=7, requests_per_model=REQUESTS_PER_MODEL)
        # Waves smaller than the ring, a scrape after each: every scrape reads on from its cursor.
        for start in range(0, len(requests), len(MODELS)):
            assert submit_all(node, requests[start : start + len(MODELS)], OUTPUT_TOKENS).wait()
            render(metrics.registry)

        snapshot = node.snapshot()
        assert snapshot.ended_total == len(requests) > ENDED_HISTORY
        assert snapshot.ended_held == ENDED_HISTORY and snapshot.live == 0
        (instance,) = snapshot.instances
        assert instance.events_held <= TIMELINE_EVENTS < instance.events_recorded
        assert len(node.timelines()[instance.name]) == instance.events_held

        families = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(render(metrics.registry)[0].decode())
            for sample in family.samples
        }

        def total(name: str) -> float:
            return sum(value for (n, _), value in families.items() if n == name)

        assert total("aegaeon_requests_total") == len(requests)
        assert total("aegaeon_generation_tokens_total") == len(requests) * OUTPUT_TOKENS
        # The histograms saw every request too: each scrape came before the ring wrapped past it.
        assert total("aegaeon_time_to_first_token_seconds_count") == len(requests)
        switches = instance.events.count.get(EventKind.SWITCH, 0)
        assert switches >= len(MODELS) and total("aegaeon_switches_total") == switches
        assert total("aegaeon_node_ended_requests_held") == ENDED_HISTORY
        assert total("aegaeon_instance_timeline_events") == instance.events_held
        for model in snapshot.models:
            assert model.totals.finished == REQUESTS_PER_MODEL and model.waiting == model.running == 0
