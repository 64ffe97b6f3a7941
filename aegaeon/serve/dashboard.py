"""Observability over HTTP: `/metrics` (Prometheus), `/dashboard` (a live page), `/dashboard/data` (its JSON).

`observability_router(metrics)` is an `APIRouter` to include in any FastAPI app: the api server's in
role "all", or a small app of its own (`ObservabilityServer`) on a node process that has no api server.
The handlers are plain functions, so FastAPI runs them in its thread pool: they read the node through
its read API (a snapshot under the node's lock, its recent history) and must not hold up the event loop
that streams tokens.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.params import Depends
from fastapi.responses import HTMLResponse, JSONResponse, Response

from aegaeon.config import SchedulerConfig
from aegaeon.instance.snapshot import InstanceSnapshot, ModelSnapshot
from aegaeon.scheduler.request import SchedRequest
from aegaeon.scheduler.slo import slo_report
from aegaeon.scheduler.timeline import TimelineEvent
from aegaeon.serve.metrics import NodeMetrics, render

PAGE_RESOURCE = "dashboard.html"
# The page shows the last minute: long enough to see rounds of several models, short enough to read.
WINDOW_S = 60.0
# `/dashboard?window=S` zooms in or out; beyond ten minutes the bars of short turns would be invisible.
MAX_WINDOW_S = 600.0
# A cap on the events one instance sends per poll, so a busy instance with very short turns cannot
# make each poll megabytes; the newest events are kept.
MAX_EVENTS_PER_INSTANCE = 4000
# The page must always show the newest data, never a cached copy.
NO_STORE = {"Cache-Control": "no-store"}
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
POLL_S = 0.01


def observability_router(metrics: NodeMetrics, dependencies: Sequence[Depends] | None = None) -> APIRouter:
    """`GET /metrics`, `GET /dashboard`, `GET /dashboard/data` for one node (`dependencies`: e.g. auth)."""
    router = APIRouter(dependencies=list(dependencies or []))
    page = dashboard_page()

    def prometheus(request: Request) -> Response:
        body, content_type = render(metrics.registry, request.headers.get("accept"))
        return Response(body, media_type=content_type)

    def dashboard() -> HTMLResponse:
        return HTMLResponse(page, headers=NO_STORE)

    def data(window_s: float = Query(WINDOW_S, gt=0, le=MAX_WINDOW_S)) -> JSONResponse:
        return JSONResponse(dashboard_data(metrics, window_s), headers=NO_STORE)

    router.add_api_route("/metrics", prometheus, methods=["GET"], include_in_schema=False)
    router.add_api_route("/dashboard", dashboard, methods=["GET"], include_in_schema=False)
    router.add_api_route("/dashboard/data", data, methods=["GET"], include_in_schema=False)
    return router


def dashboard_page() -> str:
    """The page, shipped inside the package (inline CSS and JS: nothing else to fetch)."""
    return resources.files("aegaeon.serve").joinpath(PAGE_RESOURCE).read_text(encoding="utf-8")


# -- the page's data ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EventView:
    """One timeline bar: times on the node's clock (seconds since it started)."""

    kind: str
    model: str | None
    start_s: float
    end_s: float
    tokens: int
    detail: str


def dashboard_data(metrics: NodeMetrics, window_s: float = WINDOW_S) -> dict[str, Any]:
    """What the page draws: per instance its recent timeline, per model SLO and load, memory use."""
    node = metrics.node
    snapshot = metrics.update()
    since = snapshot.now_s - window_s
    timelines = node.timelines()
    recent = _ended_since(metrics, since)
    cache, pool = snapshot.model_cache, snapshot.kv_pool
    return {
        "now_s": snapshot.now_s,
        "window_s": window_s,
        "target": metrics.target,
        "instances": [
            _instance_view(state, timelines[state.name].recent(since, MAX_EVENTS_PER_INSTANCE))
            for state in snapshot.instances
            if state.name in timelines
        ],
        "models": [_model_view(model, recent, metrics.target) for model in snapshot.models],
        "memory": {
            "model_cache": {
                "capacity_bytes": cache.capacity,
                "used_bytes": cache.used,
                "models": cache.models,
                "evictions": cache.evictions,
            },
            "kv_pool": {
                "capacity_bytes": pool.capacity_bytes,
                "allocated_bytes": pool.allocated_bytes,
                "slabs_in_use": pool.slabs_in_use,
                "slabs_total": pool.slabs_total,
            },
        },
    }


def _ended_since(metrics: NodeMetrics, since: float) -> list[SchedRequest]:
    """The held requests that ended after `since` (they are held in the order they ended)."""
    held, _ = metrics.node.ended_since(0)
    start = len(held)
    while start > 0 and (held[start - 1].finished_s or 0.0) >= since:
        start -= 1
    return held[start:]


def _instance_view(state: InstanceSnapshot, events: list[TimelineEvent]) -> dict[str, Any]:
    view = {
        field: getattr(state, field)
        for field in (
            "name",
            "role",
            "device",
            "pid",
            "up",
            "arena_bytes",
            "kv_capacity_bytes",
            "kv_used_bytes",
            "waiting",
            "running",
            "batches",
        )
    }
    view["resident"] = list(state.resident)
    view["kv_usage_ratio"] = state.kv_usage_ratio
    view["events"] = [
        asdict(EventView(e.kind.value, e.model, e.start_s, e.end_s, e.tokens, e.detail)) for e in events
    ]
    return view


def _model_view(model: ModelSnapshot, recent: list[SchedRequest], target: float) -> dict[str, Any]:
    totals = model.totals
    mine = [request for request in recent if request.model == model.name]
    slo = model.slo
    window = slo_report(mine, SchedulerConfig(default_slo=slo), target=target) if mine else None
    return {
        "name": model.name,
        "slo": {"ttft_s": slo.ttft_s, "tbt_s": slo.tbt_s},
        "waiting": model.waiting,
        "running": model.running,
        "finished": totals.finished,
        "failed": totals.failed,
        "prompt_tokens": totals.prompt_tokens,
        "generation_tokens": totals.generation_tokens,
        "attainment": totals.share(totals.qos_sum),
        "strict_attainment": totals.share(totals.slo_strict),
        # Over the requests that ended within the window: what the operator sees now.
        "recent": None
        if window is None
        else {
            "requests": window.num_requests,
            "attainment": window.attainment,
            "strict_attainment": window.strict_attainment,
            "ttft_s": window.ttft_s,
            "tbt_s": window.tbt_s,
        },
    }


# -- a server of its own, for a node process without an api server -----------------------------------------


class ObservabilityServer:
    """`/metrics` and `/dashboard` of one node on `host:port`, served by uvicorn in a background thread.

    The socket is bound in the constructor, so a busy port fails at once, in the caller's thread, and
    port 0 picks a free one (`port` then says which).
    """

    def __init__(
        self, metrics: NodeMetrics, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"
    ):
        app = FastAPI(title="aegaeon node", docs_url=None, redoc_url=None, openapi_url=None)
        app.include_router(observability_router(metrics))
        self._socket = socket.create_server((host, port), reuse_port=False)
        self.port = self._socket.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off"))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="aegaeon-metrics", daemon=True
        )

    def start(self) -> ObservabilityServer:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the metrics server did not start on {self.url}")
            time.sleep(POLL_S)
        return self

    def close(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(STOP_TIMEOUT_S)
        self._socket.close()

    def __enter__(self) -> ObservabilityServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
