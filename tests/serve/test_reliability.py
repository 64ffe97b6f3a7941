"""Faults an operator meets: a Redis restart, a SIGTERM with requests in flight, a burst past the limit.

A user sees: after Redis restarts (and forgets everything, as one without persistence does), the
nodes register again and requests are served; a request streaming while the server gets SIGTERM
runs to its end, new connections are refused, and the server leaves no shared memory behind.
"""

from __future__ import annotations

import glob
import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from aegaeon.config import DEFAULT_HEARTBEAT_INTERVAL_S, MIB, EngineConfig, NodeConfig
from aegaeon.instance.node import Node
from aegaeon.serve.api_server import build_app
from aegaeon.serve.backend import ClusterBackend
from aegaeon.serve.metadata import MemoryStore, RedisStore
from aegaeon.serve.node_server import NodeServer
from tests.serve.http_server import ServerThread
from tests.serve.redis_server import RedisServer
from tests.serve.serve_process import ServeProcess

KV_BYTES = 4 * MIB
TOKENS = 8
LONG_TOKENS = 400
# A few heartbeats: time for a node to notice Redis forgot it and write itself back.
RECOVERY_TIMEOUT_S = 15 * DEFAULT_HEARTBEAT_INTERVAL_S
POLL_S = 0.1
SHM_PATTERN = "/dev/shm/aegaeon-*"
# Concurrent requests against a waiting limit of one: most find another one waiting.
BURST = 12


def test_a_redis_restart_is_survived(five_model_dirs, profile_path):
    config = NodeConfig(profile_path=str(profile_path), engine=EngineConfig(kv_cache_bytes=KV_BYTES))
    with (
        RedisServer() as redis_server,
        Node({"llama": five_model_dirs["llama"]}, config, progress=False) as node,
    ):
        node_store, api_store = RedisStore(redis_server.url), RedisStore(redis_server.url)
        try:
            with (
                NodeServer(node, node_store),
                ServerThread(build_app(ClusterBackend(api_store))) as server,
            ):
                client = openai.OpenAI(
                    base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60
                )
                before = client.completions.create(
                    model="llama", prompt=[4, 5, 6], max_tokens=TOKENS, temperature=0
                )

                redis_server.restart()  # no persistence: every key is gone
                deadline = time.monotonic() + RECOVERY_TIMEOUT_S
                while True:
                    try:
                        after = client.completions.create(
                            model="llama", prompt=[4, 5, 6], max_tokens=TOKENS, temperature=0
                        )
                        break
                    except (openai.NotFoundError, openai.InternalServerError, openai.APIStatusError):
                        assert time.monotonic() < deadline, "the node did not come back after Redis restarted"
                        time.sleep(POLL_S)
                assert after.choices[0].text == before.choices[0].text
                assert node_store.get_request(after.id) is not None  # records are kept again
        finally:
            node_store.close()
            api_store.close()


@pytest.fixture
def shm_before():
    return set(glob.glob(SHM_PATTERN))


def test_sigterm_lets_a_streaming_request_finish_then_releases_shared_memory(
    five_model_dirs, profile_path, shm_before
):
    with ServeProcess(
        f"llama={five_model_dirs['llama']}", "--port", "0", "--profiles", str(profile_path)
    ) as server:
        url = server.wait_for(r"OpenAI API at (http://\S+)/v1").group(1)
        server.wait_for("Uvicorn running")
        assert set(glob.glob(SHM_PATTERN)) - shm_before, "the server should hold shared memory while it runs"
        events: list[str] = []
        first_chunk = threading.Event()

        def stream() -> None:
            body = {
                "model": "llama",
                "prompt": "Go",
                "max_tokens": LONG_TOKENS,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            with (
                httpx.Client(timeout=120) as http,
                http.stream("POST", f"{url}/v1/completions", json=body) as response,
            ):
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line.removeprefix("data: "))
                        first_chunk.set()

        streamer = threading.Thread(target=stream)
        streamer.start()
        assert first_chunk.wait(60)
        server.process.send_signal(signal.SIGTERM)
        assert "[DONE]" not in events, "the stream ended before the signal: nothing was drained"
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=5)  # the listener is closed while the stream drains
        streamer.join(120)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(event) for event in events[:-1]]
        assert not any("error" in chunk for chunk in chunks)
        assert chunks[-1]["usage"]["completion_tokens"] == LONG_TOKENS  # it ran to its end
        assert server.process.wait(60) in (0, -signal.SIGTERM)
    assert set(glob.glob(SHM_PATTERN)) == shm_before


def test_past_a_models_waiting_limit_requests_get_429_with_retry_after(five_model_dirs, profile_path):
    config = NodeConfig(
        profile_path=str(profile_path), engine=EngineConfig(kv_cache_bytes=KV_BYTES), max_waiting_per_model=1
    )
    store = MemoryStore()
    with (
        Node({"llama": five_model_dirs["llama"]}, config, progress=False) as node,
        NodeServer(node, store),
        ServerThread(build_app(ClusterBackend(store))) as server,
    ):
        body = {
            "model": "llama",
            "prompt": "Busy",
            "max_tokens": TOKENS,
            "ignore_eos": True,
            "temperature": 0,
        }
        with httpx.Client(base_url=server.url, timeout=120) as http, ThreadPoolExecutor(BURST) as pool:
            responses = list(pool.map(lambda _: http.post("/v1/completions", json=body), range(BURST)))
        refused = [r for r in responses if r.status_code == 429]
        served = [r for r in responses if r.status_code == 200]
        assert refused and served and len(refused) + len(served) == BURST
        for response in refused:
            assert int(response.headers["retry-after"]) >= 1
            assert response.json()["error"]["code"] == "rate_limit_exceeded"
            assert "the limit is 1" in response.json()["error"]["message"]
        assert all(r.json()["usage"]["completion_tokens"] == TOKENS for r in served)
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
        again = client.completions.create(model="llama", prompt="Busy", max_tokens=TOKENS, temperature=0)
        assert again.usage.completion_tokens >= 1  # and it serves on


def test_restarting_one_api_server_leaves_the_others_requests_running(five_model_dirs, profile_path):
    config = NodeConfig(profile_path=str(profile_path), engine=EngineConfig(kv_cache_bytes=KV_BYTES))
    with (
        RedisServer() as redis_server,
        Node({"llama": five_model_dirs["llama"]}, config, progress=False) as node,
    ):
        stores = [RedisStore(redis_server.url) for _ in range(3)]
        try:
            with (
                NodeServer(node, stores[0]),
                ServerThread(build_app(ClusterBackend(stores[1]))) as steady,
            ):
                restarted = ServerThread(build_app(ClusterBackend(stores[2]))).__enter__()
                client = openai.OpenAI(
                    base_url=f"{steady.url}/v1", api_key="unused", max_retries=0, timeout=120
                )
                stream = client.completions.create(
                    model="llama",
                    prompt="Go",
                    max_tokens=LONG_TOKENS,
                    stream=True,
                    extra_body={"ignore_eos": True},
                )
                first = next(iter(stream))
                restarted.__exit__(None, None, None)  # the other api server goes away mid-stream
                again = ServerThread(build_app(ClusterBackend(stores[2]))).__enter__()
                try:
                    texts = [first.choices[0].text] + [chunk.choices[0].text for chunk in stream]
                    assert sum(bool(text) for text in texts) > 1
                    other = openai.OpenAI(
                        base_url=f"{again.url}/v1", api_key="unused", max_retries=0, timeout=60
                    )
                    assert other.completions.create(
                        model="llama", prompt="x", max_tokens=2
                    ).usage.completion_tokens
                finally:
                    again.__exit__(None, None, None)
                record = stores[1].get_request(first.id)
                deadline = time.monotonic() + RECOVERY_TIMEOUT_S
                while record.state != "finished" and time.monotonic() < deadline:
                    time.sleep(POLL_S)
                    record = stores[1].get_request(first.id)
                assert record.state == "finished" and record.output_tokens == LONG_TOKENS
        finally:
            for store in stores:
                store.close()
