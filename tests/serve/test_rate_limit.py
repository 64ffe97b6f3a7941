"""Per-key rate limits: each API key gets its own budget of generation requests per minute."""

from __future__ import annotations

import httpx
import pytest

from aegaeon.config import MIB, ApiLimits, EngineConfig, NodeConfig
from aegaeon.instance.node import Node
from aegaeon.serve.api_server import build_app
from aegaeon.serve.backend import ClusterBackend
from aegaeon.serve.metadata import MemoryStore
from aegaeon.serve.node_server import NodeServer
from aegaeon.serve.rate_limit import RateLimiter
from tests.serve.http_server import ServerThread

KEYS = ("key-a", "key-b")
PER_MINUTE = 2


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_refills_at_its_rate_and_clients_do_not_share_one():
    clock = Clock()
    limiter = RateLimiter(3, clock=clock)
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(20.0)  # one request every 60 / 3 s
    assert limiter.take("b") == 0.0
    clock.now = 20.0
    assert limiter.take("a") == 0.0 and limiter.take("a") > 0


def test_each_key_past_its_rate_gets_429_with_retry_after(five_model_dirs, profile_path):
    config = NodeConfig(profile_path=str(profile_path), engine=EngineConfig(kv_cache_bytes=4 * MIB))
    store = MemoryStore()
    app = build_app(ClusterBackend(store), api_keys=KEYS, limits=ApiLimits(requests_per_minute=PER_MINUTE))
    with (
        Node({"llama": five_model_dirs["llama"]}, config, progress=False) as node,
        NodeServer(node, store),
        ServerThread(app) as server,
        httpx.Client(base_url=server.url, timeout=60) as http,
    ):
        body = {"model": "llama", "prompt": "Hi", "max_tokens": 2}

        def post(key: str) -> httpx.Response:
            return http.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})

        assert [post("key-a").status_code for _ in range(PER_MINUTE)] == [200] * PER_MINUTE
        refused = post("key-a")
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert f"{PER_MINUTE} requests per minute" in refused.json()["error"]["message"]
        assert post("key-b").status_code == 200  # another key has its own budget
        assert http.get("/v1/models", headers={"Authorization": "Bearer key-a"}).status_code == 200
