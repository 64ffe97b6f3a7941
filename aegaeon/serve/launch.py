"""`aegaeon serve`: run an api server, a node, or both, over one metadata store.

- role "all" (the default): a node for the configured models and the OpenAI API in one process; the
  api server still reaches the node over ZeroMQ, as it would on another machine.
- role "node": a node that registers in Redis and takes requests from any api server.
- role "api": an OpenAI API that routes to the nodes Redis lists, by load.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import signal
import socket
import threading
from collections.abc import Sequence

from aegaeon.config import MIB, ServeConfig, api_key_id
from aegaeon.instance.node import Node
from aegaeon.logs import configure_logging
from aegaeon.serve.dashboard import ObservabilityServer, observability_router
from aegaeon.serve.keys import ClusterKeys, keys_from_env_or
from aegaeon.serve.metadata import MetadataStore, open_store
from aegaeon.serve.metrics import NodeMetrics

# The curl line printed at start asks for this few tokens, so it answers at once even on a CPU.
EXAMPLE_MAX_TOKENS = 16
LOOPBACK = "127.0.0.1"


def free_port(host: str) -> int:
    """A port nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def example_curl(url: str, model: str, api_key: str | None) -> str:
    """A curl line that works against this server: a short chat completion."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Say hello"}],
        "max_tokens": EXAMPLE_MAX_TOKENS,
    }
    auth = f" -H {shlex.quote(f'Authorization: Bearer {api_key}')}" if api_key else ""
    return (
        f"curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
        f"-d {shlex.quote(json.dumps(body))}"
    )


def node_summary(node: Node, node_id: str, address: str) -> list[str]:
    """What a node runs, in a few lines, for the terminal."""
    snapshot = node.snapshot()
    lines = [f"  node {node_id} takes requests at {address}"]
    for model in snapshot.models:
        params = model.num_parameters / 1e6
        lines.append(f"  model {model.name:<24} {params:8.1f}M params  context {model.max_model_len}")
    for instance in snapshot.instances:
        arena, kv = instance.arena_bytes / MIB, instance.kv_capacity_bytes / MIB
        where = f"{instance.name:<14} {instance.device:<6} pid {instance.pid:<8}"
        lines.append(f"  instance {where} arena {arena:.0f} MiB (KV {kv:.0f} MiB)")
    lines.append(
        f"  host model cache {snapshot.model_cache.capacity / MIB:.0f} MiB, "
        f"host KV pool {snapshot.kv_pool.capacity_bytes / MIB:.0f} MiB"
    )
    return lines


def api_summary(url: str, model: str | None, api_key: str | None, keys: Sequence[str] = ()) -> list[str]:
    lines = [f"  OpenAI API at {url}/v1   (models: {url}/v1/models)"]
    if keys:
        # Ids, not keys: what api_key_weights, the logs and the scheduler name a key by.
        lines.append(f"  API key ids: {', '.join(api_key_id(key) for key in keys)}")
    if model is not None:
        lines.append(f"  try:  {example_curl(url, model, api_key)}")
    return lines


def _first(keys: tuple[str, ...]) -> str | None:
    """The key the printed curl line uses."""
    return keys[0] if keys else None


def run_server(config: ServeConfig) -> None:
    """Serve until interrupted; shared memory and store registrations are released on the way out."""
    configure_logging(config.log_format)
    try:
        keys = keys_from_env_or(config.cluster_keys)
        if config.role == "node":  # before loading anything: a refused address fails at once
            from aegaeon.serve.node_server import check_listen_address

            check_listen_address(config.host, keys, config.insecure)
    except ValueError as error:
        raise SystemExit(f"aegaeon serve: {error}") from None
    store = open_store(config.redis_url, finished_ttl_s=config.finished_ttl_s)
    try:
        if config.role == "api":
            _run_api(config, store, keys)
        elif config.role == "node":
            _run_node(config, store, keys)
        else:
            _run_all(config, store, keys)
    finally:
        store.close()


def _start_node(config: ServeConfig, store: MetadataStore, keys: ClusterKeys | None):
    from aegaeon.serve.node_server import NodeServer

    # With the api server in this process, the node port only needs to be reachable from here.
    host = config.host if config.role == "node" else LOOPBACK
    node = Node({m.name: m.path for m in config.models}, config.node)
    try:
        return node, NodeServer(
            node,
            store,
            host=host,
            port=config.node_port,
            keys=keys,
            insecure=config.insecure,
            heartbeat_interval_s=config.liveness.heartbeat_interval_s,
        )
    except BaseException:
        node.close()
        raise


def _http(config: ServeConfig, store: MetadataStore, keys: ClusterKeys | None):
    from aegaeon.serve.api_server import build_app
    from aegaeon.serve.backend import ClusterBackend

    port = config.port or free_port(config.host)
    backend = ClusterBackend(store, keys=keys, liveness=config.liveness)
    app = build_app(
        backend,
        api_keys=config.api_keys,
        limits=config.limits,
        admin_key=config.admin_key,
        api_key_weights=dict(config.api_key_weights),
    )
    return backend, app, f"http://{config.host}:{port}", port


def _run_all(config: ServeConfig, store: MetadataStore, keys: ClusterKeys | None) -> None:
    from aegaeon.serve.api_server import serve_http

    node, server = _start_node(config, store, keys)

    def stop() -> None:
        server.close()
        node.close()

    try:
        backend, app, url, port = _http(config, store, keys)
        app.include_router(observability_router(NodeMetrics(node)))
        lines = ["aegaeon is serving", *node_summary(node, server.node_id, server.address)]
        lines.append(f"  dashboard at {url}/dashboard   Prometheus metrics at {url}/metrics")
        first_model = config.models[0].name
        print(
            "\n".join([*lines, *api_summary(url, first_model, _first(config.api_keys), config.api_keys)]),
            flush=True,
        )
        # uvicorn re-raises SIGTERM/SIGINT once it has shut down: release the node before that.
        serve_http(
            app,
            config.host,
            port,
            on_shutdown=lambda: (backend.close(), stop()),
            drain_timeout_s=config.drain_timeout_s,
        )
    finally:
        stop()


def _run_api(config: ServeConfig, store: MetadataStore, keys: ClusterKeys | None) -> None:
    from aegaeon.serve.api_server import serve_http

    backend, app, url, port = _http(config, store, keys)
    models = [info.name for info in asyncio.run(backend.models())]
    lines = [f"aegaeon api server {backend.api_server_id} (metadata in {config.redis_url})"]
    lines.append(f"  models of the live nodes now: {', '.join(models) or 'none yet'}")
    print(
        "\n".join(
            [
                *lines,
                *api_summary(url, models[0] if models else None, _first(config.api_keys), config.api_keys),
            ]
        ),
        flush=True,
    )
    serve_http(app, config.host, port, on_shutdown=backend.close, drain_timeout_s=config.drain_timeout_s)


def _run_node(config: ServeConfig, store: MetadataStore, keys: ClusterKeys | None) -> None:
    node, server = _start_node(config, store, keys)
    stopped = threading.Event()
    observability = None
    try:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stopped.set())
        lines = [
            f"aegaeon node (metadata in {config.redis_url})",
            *node_summary(node, server.node_id, server.address),
        ]
        if config.metrics_port is not None:
            metrics = NodeMetrics(node)
            observability = ObservabilityServer(metrics, config.host, config.metrics_port).start()
            lines.append(
                f"  dashboard at {observability.url}/dashboard   metrics at {observability.url}/metrics"
            )
        print("\n".join(lines), flush=True)
        stopped.wait()
        live = node.snapshot().live
        print(f"draining: finishing {live} request(s) in flight, taking no new ones", flush=True)
        if not server.drain(config.drain_timeout_s):
            left = node.snapshot().live
            print(
                f"{left} request(s) still running after {config.drain_timeout_s:g} s; stopping",
                flush=True,
            )
    finally:
        if observability is not None:
            observability.close()
        server.close()
        node.close()
