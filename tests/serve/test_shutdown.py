"""Stopping a server whose node has failed: SIGTERM ends it in bounded time, and it leaves no shared memory.

An operator sees: the node fails (its instance process keeps dying, more often than the node
restarts it), requests get errors, and `kill -TERM` still stops the server within the drain timeout
plus a few seconds, with no `aegaeon-*` files left in /dev/shm.
"""

from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import threading
import time

import httpx
import yaml

from aegaeon.config import MIB
from aegaeon.instance.node import MAX_RESTARTS
from benchmarks.served import children
from tests.serve.serve_process import ServeProcess

MODELS = ("llama", "mistral", "qwen2")
DRAIN_TIMEOUT_S = 3.0
# What shutting down may take past the drain timeout (closing sockets, stopping instance processes).
SHUTDOWN_SLACK_S = 5.0
KV_BYTES = 4 * MIB
LONG_TOKENS = 400
BURST_PER_MODEL = 4
FAILURE_TIMEOUT_S = 120.0
RESTART_TIMEOUT_S = 120.0
# The api server's log line for a request its node failed.
FAILED = r"request \S+ failed on"
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
                "host_kv_pool_bytes": 16 * MIB,
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
        # Kill the instance process each time the node restarts it, until the node gives up.
        killed: set[int] = set()
        while (pid := new_instance_pid(server, killed, RESTART_TIMEOUT_S)) is not None:
            os.kill(pid, signal.SIGKILL)
        assert len(killed) <= MAX_RESTARTS + 1, "the node restarted its instance more often than allowed"
        server.wait_for(FAILED, FAILURE_TIMEOUT_S)
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


def new_instance_pid(server: ServeProcess, seen: set[int], timeout_s: float) -> int | None:
    """The pid of the server's instance process (`python -m aegaeon.instance.worker`) not in `seen`,
    once it runs (added to `seen`); None once the node has failed requests instead of restarting it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(re.search(FAILED, line) for line in server.lines):
            return None
        for child in children(server.process.pid):
            try:
                with open(f"/proc/{child}/cmdline", "rb") as cmdline:
                    worker = b"aegaeon.instance.worker" in cmdline.read()
            except OSError:
                continue
            if worker and child not in seen:
                seen.add(child)
                return child
        time.sleep(0.1)
    raise AssertionError(f"no new instance process, and no failure, after {timeout_s} s")

