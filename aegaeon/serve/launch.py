"""`aegaeon serve`: start a node for the configured models and serve it over the OpenAI API."""

from __future__ import annotations

import json
import shlex
import socket

from aegaeon.config import MIB, ServeConfig
from aegaeon.instance.node import Node

# The curl line printed at start asks for this few tokens, so it answers at once even on a CPU.
EXAMPLE_MAX_TOKENS = 16


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


def summary(node: Node, config: ServeConfig, url: str) -> str:
    """What runs where, in a few lines, for the terminal."""
    lines = ["aegaeon is serving"]
    for name, served in node.models.items():
        params = served.arch.num_parameters() / 1e6
        lines.append(f"  model {name:<24} {params:8.1f}M params  context {served.max_model_len}")
    for instance in node.instances:
        engine = instance.engine
        arena, kv = engine.arena.capacity / MIB, engine.kv_bytes / MIB
        where = f"{instance.instance_name:<14} {engine.device.type:<5}"
        lines.append(f"  instance {where} arena {arena:.0f} MiB (KV {kv:.0f} MiB)")
    lines.append(
        f"  host model cache {node.model_cache.region.nbytes / MIB:.0f} MiB, "
        f"host KV pool {node.kv_pool.capacity_bytes / MIB:.0f} MiB"
    )
    lines.append(f"  OpenAI API at {url}/v1   (models: {url}/v1/models)")
    lines.append(f"  try:  {example_curl(url, next(iter(node.models)), config.api_key)}")
    return "\n".join(lines)


def run_server(config: ServeConfig) -> None:
    """Serve until interrupted; the node's shared memory is released on the way out."""
    from aegaeon.serve.api_server import build_app, serve_http
    from aegaeon.serve.backend import NodeBackend

    port = config.port or free_port(config.host)
    url = f"http://{config.host}:{port}"
    node = Node({m.name: m.path for m in config.models}, config.node)
    try:
        app = build_app(NodeBackend(node), api_key=config.api_key)
        print(summary(node, config, url), flush=True)
        # uvicorn re-raises SIGTERM/SIGINT once it has shut down: release the node before that.
        serve_http(app, config.host, port, on_shutdown=node.close)
    finally:
        node.close()
