"""Stopping a server whose node has failed: SIGTERM ends it in bounded time, and it leaves no shared memory.

An operator sees: the node fails (its host KV pool is too small for what a burst of long requests
swaps out), requests get errors, and `kill -TERM` still stops the server within the drain timeout
plus a few seconds, with no `aegaeon-*` files left in /dev/shm.
"""

from __future__ import annotations

import glob
import signal
import subprocess
import threading
import time

import httpx
import yaml

from aegaeon.config import MIB
from tests.serve.serve_process import ServeProcess

MODELS = ("llama", "mistral", "qwen2")
DRAIN_TIMEOUT_S = 3.0
# What shutting down may take past the drain timeout (closing sockets, stopping instance processes).
SHUTDOWN_SLACK_S = 5.0
# One slab, a few blocks: a batch of long requests swapped out when another model takes its turn
# needs more, so the pool runs out and the node fails.
HOST_KV_POOL_BYTES = MIB // 16
KV_BYTES = 4 * MIB
LONG_TOKENS = 400
BURST_PER_MODEL = 4
FAILURE_TIMEOUT_S = 120.0
# A node's regions carry its pid (aegaeon/memory/shm.py), so other processes' regions do not count.
SHM_PATTERN = "/dev/shm/aegaeon-*-{pid}-*"


def test_sigterm_after_the_node_failed_exits_in_time_and_leaves_no_shared_memory(
    five_model_dirs, profile_path, tmp_path
):
    config = tmp_path / "serve.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "models": [f"{name}={five_model_dirs[name]}" for name in MODELS],
                "host_kv_pool_bytes": HOST_KV_POOL_BYTES,
                "kv_slab_bytes": HOST_KV_POOL_BYTES,
                "kv_cache_bytes": KV_BYTES,
            }
        )
    )
    with ServeProcess(
        "--config",
        str(config),
        "--port",
        "0",
        "--profiles",
        str(profile_path),
        "--drain-timeout",
        str(DRAIN_TIMEOUT_S),
    ) as server:
        url = server.wait_for(r"OpenAI API at (http://\S+)/v1").group(1)
        server.wait_for("Uvicorn running")
        regions = SHM_PATTERN.format(pid=server.process.pid)
        assert glob.glob(regions), "the server should hold shared memory while it runs"
        statuses: list[int | str] = []

        def long_request(model: str) -> None:
            body = {"model": model, "prompt": "Go", "max_tokens": LONG_TOKENS, "ignore_eos": True}
            try:
                statuses.append(httpx.post(f"{url}/v1/completions", json=body, timeout=300).status_code)
            except httpx.HTTPError as error:
                statuses.append(type(error).__name__)

        burst = [
            threading.Thread(target=long_request, args=(model,), daemon=True)
            for _ in range(BURST_PER_MODEL)
            for model in MODELS
        ]
        for thread in burst:
            thread.start()
        server.wait_for(r"request \S+ failed on", FAILURE_TIMEOUT_S)
        # Requests keep arriving at the failed node while it stops.
        threading.Thread(target=long_request, args=(MODELS[0],), daemon=True).start()

        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        limit_s = DRAIN_TIMEOUT_S + SHUTDOWN_SLACK_S
        try:
            code = server.process.wait(limit_s)
        except subprocess.TimeoutExpired:
            output = "".join(server.lines[-40:])
            raise AssertionError(f"still running {limit_s} s after SIGTERM:\n{output}") from None
        assert code in (0, -signal.SIGTERM), "".join(server.lines[-40:])
        assert time.monotonic() - started <= limit_s
        assert any(status != 200 for status in statuses), statuses  # the node did fail requests
    assert not glob.glob(regions)
