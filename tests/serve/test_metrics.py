"""`/metrics` of a real node, scraped over HTTP while several models share one instance.

An operator sees: the request counters, token counters and latency histograms fill exactly as the
traffic goes; the switch counter rises as models take turns on the instance; queue depth and running
requests rise during the run and fall back to zero after it.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from aegaeon.config import MIB, SLO, EngineConfig, MemoryConfig, NodeConfig, SchedulerConfig
from aegaeon.engine.sampling_params import SamplingParams
from aegaeon.instance.node import Node
from aegaeon.scheduler.request import SchedRequest
from aegaeon.scheduler.slo import slo_report_by_model
from aegaeon.scheduler.timeline import EventKind
from aegaeon.serve.dashboard import ObservabilityServer, observability_router
from aegaeon.serve.metrics import NodeMetrics, render
from tests.serve.http_server import ServerThread

# Three shapes, so a switch always changes weights and KV layout.
MODELS = ("llama", "mistral", "qwen2")
REQUESTS_PER_MODEL = 3
OUTPUT_TOKENS = 24
KV_BYTES = 4 * MIB
# Room for the weights of one of the models (0.7 to 0.9 MiB each) at a time: every switch copies
# weights, as on a device serving more models than it holds, so a round's switch cost is above zero and
# its quotas are short: the models take turns token by token (with every model resident, the round
# would give each batch one long turn instead).
WEIGHT_BYTES = MIB + MIB // 4
# A TBT far above any step of these tiny models, even on a loaded machine: rounds interleave models
# token by token instead of giving each batch long turns (tests/instance/test_node.py says why).
RELAXED_SLO = SLO(ttft_s=60.0, tbt_s=5.0)
RUN_TIMEOUT_S = 60.0
SCRAPE_EVERY_S = 0.1


def node_config(profile_path) -> NodeConfig:
    return NodeConfig(
        profile_path=str(profile_path),
        scheduler=SchedulerConfig(default_slo=RELAXED_SLO),
        engine=EngineConfig(kv_cache_bytes=KV_BYTES),
        memory=MemoryConfig(
            cpu_arena_bytes=KV_BYTES + WEIGHT_BYTES, host_kv_pool_bytes=64 * MIB, kv_slab_bytes=4 * MIB
        ),
    )


def workload(seed: int, requests_per_model: int = REQUESTS_PER_MODEL) -> list[tuple[str, str, list[int]]]:
    """(request id, model, prompt token ids), the models taking turns."""
    rng = random.Random(seed)
    return [
        (f"{model}-{seed}-{i}", model, [rng.randrange(3, 900) for _ in range(rng.randint(2, 30))])
        for i in range(requests_per_model)
        for model in MODELS
    ]


@dataclass
class Run:
    """Requests submitted together: `done` is set when all have finished or one has failed."""

    done: threading.Event = field(default_factory=threading.Event)
    finished: set[str] = field(default_factory=set)
    errors: list[BaseException] = field(default_factory=list)

    def wait(self, timeout_s: float = RUN_TIMEOUT_S) -> bool:
        """True if every request finished within the timeout."""
        return self.done.wait(timeout_s) and not self.errors


def submit_all(
    node: Node, requests: list[tuple[str, str, list[int]]], output_tokens: int = OUTPUT_TOKENS
) -> Run:
    """Submit every request at once."""
    run = Run()

    def on_output(output) -> None:
        if output.finished:
            run.finished.add(output.request_id)
            if len(run.finished) == len(requests):
                run.done.set()

    def on_error(error: BaseException) -> None:
        run.errors.append(error)
        run.done.set()

    params = SamplingParams(temperature=0, max_tokens=output_tokens, ignore_eos=True)
    for request_id, model, prompt in requests:
        node.submit(prompt, params, model, on_output, on_error, request_id=request_id)
    return run


@pytest.fixture(scope="module")
def node(five_model_dirs, profile_path):
    with Node({m: five_model_dirs[m] for m in MODELS}, node_config(profile_path), progress=False) as node:
        yield node


@pytest.fixture(scope="module")
def metrics(node) -> NodeMetrics:
    return NodeMetrics(node)


@pytest.fixture(scope="module")
def server(metrics):
    app = FastAPI()
    app.include_router(observability_router(metrics))
    with ServerThread(app) as server:
        yield server


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    """Every sample of /metrics, by (name, sorted labels)."""
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.content)


def parse(text: bytes) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def total(
    samples: Samples, name: str, where: Callable[[dict[str, str]], bool] = lambda labels: True
) -> float:
    return sum(v for (n, labels), v in samples.items() if n == name and where(dict(labels)))


def test_metrics_follow_a_multi_model_run(node, server):
    before = scrape(server.url)
    for model in MODELS:  # every model's series exist, at zero, before its first request
        assert value(before, "aegaeon_requests_total", model=model, outcome="finished") == 0
        assert value(before, "aegaeon_time_to_first_token_seconds_count", model=model) == 0
        assert value(before, "aegaeon_requests_waiting", model=model) == 0
    instance = node.instances[0].instance_name
    for model in MODELS:  # as are the switch series, so rate() sees the first switch
        for kind in ("loaded", "resident"):
            assert (
                "aegaeon_switches_total",
                (("instance_name", instance), ("model", model), ("switch", kind)),
            ) in before
    switches_before = total(before, "aegaeon_switches_total")

    requests = workload(seed=1)
    run = submit_all(node, requests)
    in_flight_seen = 0.0
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not run.done.is_set() and time.monotonic() < deadline:
        during = scrape(server.url)
        in_flight_seen = max(
            in_flight_seen,
            total(during, "aegaeon_requests_waiting") + total(during, "aegaeon_requests_running"),
        )
        time.sleep(SCRAPE_EVERY_S)
    assert run.wait(), run.errors
    after = scrape(server.url)
    assert in_flight_seen > 0  # the queue and running gauges moved with the traffic

    timeline = node.instances[0].timeline
    for model in MODELS:
        mine = [prompt for _, m, prompt in requests if m == model]
        assert value(after, "aegaeon_requests_total", model=model, outcome="finished") == len(mine)
        assert value(after, "aegaeon_requests_total", model=model, outcome="failed") == 0
        assert value(after, "aegaeon_generation_tokens_total", model=model) == len(mine) * OUTPUT_TOKENS
        assert value(after, "aegaeon_prompt_tokens_total", model=model) == sum(len(p) for p in mine)
        assert value(after, "aegaeon_time_to_first_token_seconds_count", model=model) == len(mine)
        gaps = len(mine) * (OUTPUT_TOKENS - 1)
        assert value(after, "aegaeon_time_between_tokens_seconds_count", model=model) == gaps
        assert value(after, "aegaeon_time_to_first_token_seconds_sum", model=model) > 0
        assert value(after, "aegaeon_requests_waiting", model=model) == 0
        assert value(after, "aegaeon_requests_running", model=model) == 0
    # The attainment gauges are the scheduler's own SLO report of the same requests.
    reports = slo_report_by_model(node.completed, node.config.scheduler)
    for model in MODELS:
        assert value(after, "aegaeon_slo_attainment_ratio", model=model) == pytest.approx(
            reports[model].attainment
        )
        assert value(after, "aegaeon_slo_strict_attainment_ratio", model=model) == pytest.approx(
            reports[model].strict_attainment
        )

    # Models took turns on the one instance: the switch counter rose by at least one switch per model
    # and counts exactly the switches of the timeline, as does the switch latency histogram.
    switches = total(after, "aegaeon_switches_total")
    assert switches - switches_before >= len(MODELS)
    assert switches == len(timeline.of_kind(EventKind.SWITCH))
    assert total(after, "aegaeon_switch_duration_seconds_count") == switches
    assert any(timeline.interleaved(model) for model in MODELS), [e.model for e in timeline.events]
    assert value(after, "aegaeon_instance_busy_seconds_total", instance_name=instance, kind="decode_turn") > 0
    assert value(after, "aegaeon_instance_up", instance_name=instance) == 1
    assert value(after, "aegaeon_host_model_cache_models") == len(MODELS)
    assert (
        0
        < value(after, "aegaeon_host_model_cache_used_bytes")
        <= value(after, "aegaeon_host_model_cache_capacity_bytes")
    )
    resident = {
        m for m in MODELS if value(after, "aegaeon_instance_model_resident", instance_name=instance, model=m)
    }
    assert resident == set(node.instances[0].resident)

    # A second wave adds to the counters rather than replacing them.
    second = workload(seed=2, requests_per_model=1)
    assert submit_all(node, second).wait()
    again = scrape(server.url)
    assert total(again, "aegaeon_requests_total") == len(requests) + len(second)
    assert total(again, "aegaeon_generation_tokens_total") == (len(requests) + len(second)) * OUTPUT_TOKENS
    assert total(again, "aegaeon_switches_total") >= switches


def test_a_failed_request_counts_as_failed_and_scores_zero(node, metrics):
    """A request the node gave up on (recorded as `Node._fail` records one) moves the failed counter."""
    model = MODELS[0]
    before = parse(render(metrics.registry)[0])
    request = SchedRequest("failed-0", model, node.now(), prompt_len=5, max_tokens=8)
    request.fail(node.now())
    with node.lock:
        node.request_ended(request)
    after = parse(render(metrics.registry)[0])
    failed = ("aegaeon_requests_total", (("model", model), ("outcome", "failed")))
    assert after[failed] == before.get(failed, 0) + 1
    assert after[("aegaeon_prompt_tokens_total", (("model", model),))] == (
        before[("aegaeon_prompt_tokens_total", (("model", model),))] + 5
    )
    ttft = ("aegaeon_time_to_first_token_seconds_count", (("model", model),))
    assert after[ttft] == before[ttft]  # no first token, nothing to observe
    ended = sum(
        v for (n, labels), v in after.items() if n == "aegaeon_requests_total" and ("model", model) in labels
    )
    # The failed request scores 0: the mean QoS over `ended` requests is the old sum over `ended` - 1.
    attainment = ("aegaeon_slo_attainment_ratio", (("model", model),))
    assert after[attainment] * ended == pytest.approx(before[attainment] * (ended - 1))
    met = ("aegaeon_slo_met_requests_total", (("model", model),))
    assert after[met] == before[met]


def test_each_node_metrics_has_its_own_registry(node, metrics, server):
    other = NodeMetrics(node)  # would clash on the default registry
    assert other.registry is not metrics.registry
    body, content_type = render(other.registry)
    assert content_type.startswith("text/plain") and b"aegaeon_requests_total" in body
    body, content_type = render(other.registry, "application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")
    response = httpx.get(
        f"{server.url}/metrics", headers={"Accept": "application/openmetrics-text"}, timeout=10
    )
    assert response.headers["content-type"].startswith("application/openmetrics-text")


def test_a_node_without_an_api_server_serves_metrics_and_dashboard_on_its_own_port(node, metrics):
    with ObservabilityServer(metrics, port=0) as server:
        assert server.port > 0
        assert "aegaeon_switches" in httpx.get(f"{server.url}/metrics", timeout=10).text
        page = httpx.get(f"{server.url}/dashboard", timeout=10)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        data = httpx.get(f"{server.url}/dashboard/data", timeout=10).json()
        assert [m["name"] for m in data["models"]] == list(MODELS)
        assert [i["name"] for i in data["instances"]] == [i.instance_name for i in node.instances]
