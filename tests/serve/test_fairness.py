"""Fair sharing by API key over the real serving path: a real node, a real uvicorn server with two API
keys, the official openai client.

What reaches the scheduler is the key's id and weight, never the key. A light key's requests go ahead
of a heavy key's flood on the same model: while one waits, at most a few heavy requests start (in one
shared queue, every heavy request queued before it would), and they meet their TTFT SLO. TTFTs
themselves against a tight SLO are checked on the simulator's clock, with the same scheduler classes,
in tests/scheduler/test_fairness.py: a shared 2-core machine cannot time a live server to an SLO
reliably, but the order in which requests start does not depend on the machine's speed.
"""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import openai
import pytest

from aegaeon.config import MIB, EngineConfig, NodeConfig, SchedulerConfig, api_key_id, build_serve_config
from aegaeon.instance.node import Node
from aegaeon.scheduler.slo import request_score
from aegaeon.serve.api_server import build_app
from aegaeon.serve.backend import ClusterBackend
from aegaeon.serve.dashboard import observability_router
from aegaeon.serve.metadata import MemoryStore
from aegaeon.serve.metrics import NodeMetrics
from aegaeon.serve.node_server import NodeServer
from tests.serve.http_server import ServerThread

HEAVY_KEY, LIGHT_KEY = "sk-heavy-secret-1234", "sk-light-secret-5678"
ADMIN_KEY = "sk-admin-secret-0000"
LIGHT_WEIGHT = 2.0
MODEL = "llama"
# The heavy key sends ten requests for each of the light key's.
LIGHT_REQUESTS, RATE_RATIO = 6, 10
LIGHT_GAP_S = 0.3
MAX_TOKENS = 4
# Heavy first tokens a light request may see while it waits: the heavy request running when it came,
# one whose tag ties with its own, and one more for a prefill claimed at that moment.
MAX_PASSED = 3


@pytest.fixture(scope="module")
def served(five_model_dirs, profile_path):
    config = NodeConfig(
        profile_path=str(profile_path),
        engine=EngineConfig(kv_cache_bytes=16 * MIB),
        scheduler=SchedulerConfig(),
    )
    store = MemoryStore()
    with Node({MODEL: five_model_dirs[MODEL]}, config, progress=False) as node, NodeServer(node, store):
        app = build_app(
            ClusterBackend(store),
            api_keys=(HEAVY_KEY, LIGHT_KEY),
            api_key_weights={api_key_id(LIGHT_KEY): LIGHT_WEIGHT},
            admin_key=ADMIN_KEY,
        )
        app.include_router(observability_router(NodeMetrics(node)))
        with ServerThread(app) as server:
            yield node, server, five_model_dirs[MODEL]


def _ended(node: Node) -> dict:
    requests, _ = node.ended_since(0)
    return {r.request_id: r for r in requests}


def test_the_scheduler_sees_each_keys_id_and_weight_never_the_key(served, caplog):
    node, server, _ = served
    caplog.set_level(logging.DEBUG)
    ids = {}
    for key in (HEAVY_KEY, LIGHT_KEY):
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key=key) as client:
            ids[key] = client.completions.create(model=MODEL, prompt="Hello", max_tokens=MAX_TOKENS).id
    ended = _ended(node)
    heavy, light = ended[ids[HEAVY_KEY]], ended[ids[LIGHT_KEY]]
    assert (heavy.key, heavy.key_weight) == (api_key_id(HEAVY_KEY), 1.0)
    assert (light.key, light.key_weight) == (api_key_id(LIGHT_KEY), LIGHT_WEIGHT)
    assert heavy.key.startswith("key-") and HEAVY_KEY not in heavy.key
    # The request log names the key by its id; no log line holds a key.
    logged = [getattr(record, "api_key_id", None) for record in caplog.records]
    assert api_key_id(LIGHT_KEY) in logged
    text = caplog.text + " ".join(str(record.__dict__) for record in caplog.records)
    assert HEAVY_KEY not in text and LIGHT_KEY not in text
    metrics = httpx.get(f"{server.url}/metrics").text
    assert HEAVY_KEY not in metrics and LIGHT_KEY not in metrics


def test_a_light_key_goes_ahead_of_a_heavy_keys_flood(served):
    """The heavy key sends ten requests for each of the light key's, all at once; the light key's come
    0.3 s apart while the flood is queued. A light request may wait behind the heavy request running
    when it arrives and the one whose fair-queuing tag ties with its own, not behind the flood (in one
    shared queue it would wait behind every heavy request queued before it)."""
    node, server, _ = served

    async def one(client: openai.AsyncOpenAI, index: int, delay_s: float) -> str:
        await asyncio.sleep(delay_s)
        prompt = f"Request {index}: " + "tell me a story " * 75
        completion = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True}
        )
        return completion.id

    async def flood() -> tuple[list[str], list[str]]:
        heavy = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=HEAVY_KEY, timeout=300)
        light = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=LIGHT_KEY, timeout=300)
        async with heavy, light:
            ids = await asyncio.gather(
                *(one(heavy, i, 0.0) for i in range(LIGHT_REQUESTS * RATE_RATIO)),
                *(one(light, i, LIGHT_GAP_S * (i + 1)) for i in range(LIGHT_REQUESTS)),
            )
        return ids[: LIGHT_REQUESTS * RATE_RATIO], ids[LIGHT_REQUESTS * RATE_RATIO :]

    heavy_ids, light_ids = asyncio.run(flood())
    ended = _ended(node)
    heavy, light = [ended[i] for i in heavy_ids], [ended[i] for i in light_ids]
    assert all(r.generated == MAX_TOKENS for r in heavy + light)
    for waiting in light:
        # Heavy requests that got their first token while this light one waited for its own.
        passed = [h for h in heavy if waiting.arrival_s < h.first_token_s < waiting.first_token_s]
        assert len(passed) <= MAX_PASSED, (waiting.request_id, len(passed))
    slo = node.config.scheduler.slo(MODEL)
    assert sum(request_score(r, slo).met_ttft for r in light) / len(light) >= 0.95


def test_a_model_added_with_a_priority_is_scheduled_with_it(served):
    node, server, model_dir = served
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(base_url=server.url, headers=admin, timeout=120) as http:
        path = json.dumps(str(model_dir))
        # Each priority as JSON text: 1e999 is a JSON number that reads as infinity.
        for priority, message in (
            ("0", "greater than 0"),
            ('"high"', "valid number"),
            ("1e999", "finite number"),
        ):
            text = f'{{"name": "extra", "path": {path}, "priority": {priority}}}'
            refused = http.post(
                "/v1/admin/models", content=text, headers={"Content-Type": "application/json"}
            )
            assert refused.status_code == 400 and message in refused.json()["error"]["message"], refused.text
        body = {"name": "extra", "path": str(model_dir), "priority": 3}
        added = http.post("/v1/admin/models", json=body)
        assert added.status_code == 201, added.text
        assert added.json()["settings"]["priority"] == 3
        assert node.config.scheduler.priority("extra") == 3.0
        assert node.config.scheduler.priority(MODEL) == 1.0
        assert http.delete("/v1/admin/models/extra").status_code == 200


# --- configuration -------------------------------------------------------------------------------


def test_priorities_and_key_weights_come_from_the_yaml_settings(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"{LIGHT_KEY}\n")
    config = build_serve_config(
        {
            "models": [{"name": "chat", "path": "/m/chat", "priority": 2}, "code=/m/code"],
            "api_key": HEAVY_KEY,
            "api_key_file": str(keys_file),
            "api_key_weights": {HEAVY_KEY: 0.5, api_key_id(LIGHT_KEY): 3},
        }
    )
    assert [m.priority for m in config.models] == [2.0, 1.0]
    assert config.node.scheduler.priority("chat") == 2.0 and config.node.scheduler.priority("code") == 1.0
    # A key may be named itself or by its id; the config holds ids only.
    assert dict(config.api_key_weights) == {api_key_id(HEAVY_KEY): 0.5, api_key_id(LIGHT_KEY): 3.0}
    assert HEAVY_KEY not in repr(config.api_key_weights)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"models": [{"path": "/m", "priority": 0}]}, "priority of model 'm' must be a positive number"),
        ({"models": [{"path": "/m", "priority": "high"}]}, "positive number"),
        ({"models": ["a=/m"], "api_key_weights": {"sk-typo": 2}}, "neither a configured API key"),
        ({"models": ["a=/m"], "api_key_weights": [1]}, "must map API keys"),
        ({"models": ["a=/m"], "api_key": HEAVY_KEY, "api_key_weights": {HEAVY_KEY: -1}}, "positive number"),
    ],
)
def test_bad_priorities_and_key_weights_say_what_to_fix(settings, message):
    with pytest.raises(ValueError, match=message) as raised:
        build_serve_config(settings)
    assert "sk-typo" not in str(raised.value)
