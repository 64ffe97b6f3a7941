"""The live model registry end to end: a node's processes, a real uvicorn server, the official client.

An operator adds a model through the admin API while another model streams, clients are served by it
exactly (transformers' greedy tokens), `/v1/models` shows where it is at each step, and removing it
lets its request in flight finish first. A wrong admin key gets 401; without an admin key configured
the admin routes do not exist. The suite runs on one machine (metadata in process) and as a cluster
sharing a real `redis-server`, where the model is added through one api server and served by another.
"""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from aegaeon.config import MIB, EngineConfig, MemoryConfig, NodeConfig
from aegaeon.engine.engine import LLMEngine
from aegaeon.engine.tokenizer import Tokenizer
from aegaeon.instance.node import Node
from aegaeon.serve.api_server import build_app
from aegaeon.serve.backend import ClusterBackend
from aegaeon.serve.engine_backend import EngineBackend
from aegaeon.serve.metadata import MemoryStore, RedisStore
from aegaeon.serve.model_states import DEVICE, DISK, HOST, LOADING
from aegaeon.serve.node_server import NodeServer
from tests.serve.api_checks import GREEDY
from tests.serve.http_server import ServerThread
from tests.serve.redis_server import RedisServer

ADMIN_KEY = "admin-secret"
KV_BYTES = 4 * MIB
# Room for the served model and the one added (the default sizes the cache to the models at start).
HOST_CACHE_BYTES = 16 * MIB
SERVED, ADDED = "mistral", "mistral-b"
# The added model has the served one's shape (other weights): its latency profile is known, so adding
# it measures nothing (a shape not profiled yet is measured first, which takes long on a CPU).
ADDED_MODEL = dict(arch="mistral", num_layers=3, seed=7)
LONG_TOKENS = 200  # the stream that runs while the model is added
TOKENS = 8
PROMPT = [3, 1, 4, 1, 5]
SETTLE_TIMEOUT_S = 30.0
POLL_S = 0.02


@pytest.fixture(scope="module")
def model_dirs(five_model_dirs, make_demo_model):
    return {SERVED: five_model_dirs[SERVED], ADDED: make_demo_model(**ADDED_MODEL)}


@pytest.fixture(scope="module", params=["memory", "redis"])
def cluster(request, model_dirs, profile_path):
    """A node serving SERVED, and two api servers with the admin key over one store (Redis: one each)."""
    memory = MemoryConfig(host_model_cache_bytes=HOST_CACHE_BYTES)
    config = NodeConfig(
        profile_path=str(profile_path), engine=EngineConfig(kv_cache_bytes=KV_BYTES), memory=memory
    )
    redis_server = RedisServer().__enter__() if request.param == "redis" else None
    if redis_server is None:
        stores = [MemoryStore()] * 3
    else:
        stores = [RedisStore(redis_server.url) for _ in range(3)]  # the node's, and each api server's
    node = Node({SERVED: model_dirs[SERVED]}, config, progress=False)
    node_server = NodeServer(node, stores[0])
    servers = [ServerThread(build_app(ClusterBackend(store), admin_key=ADMIN_KEY)) for store in stores[1:]]
    try:
        for server in servers:
            server.__enter__()
        yield node, stores[0], servers
    finally:
        for server in servers:
            server.__exit__(None, None, None)
        node_server.close()
        node.close()
        for store in set(stores):
            store.close()
        if redis_server is not None:
            redis_server.__exit__(None, None, None)


def openai_client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def card(http: httpx.Client, name: str) -> dict | None:
    """The model's card from `/v1/models` (None if it is not listed)."""
    return next((m for m in http.get("/v1/models").json()["data"] if m["id"] == name), None)


def wait_for_state(http: httpx.Client, name: str, state: str) -> dict:
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while (found := card(http, name)) is None or found["state"] != state:
        assert time.monotonic() < deadline, f"{name} never got to {state}: {found}"
        time.sleep(POLL_S)
    return found


def greedy_text(model_dirs, tokenizers, hf_greedy, name: str, tokens: int) -> str:
    return tokenizers[name].decode(hf_greedy(model_dirs[name], PROMPT, tokens))


@pytest.fixture(scope="module")
def tokenizers(model_dirs):
    return {name: Tokenizer.from_pretrained(path) for name, path in model_dirs.items()}


def test_add_serve_and_remove_a_model_while_another_streams(cluster, model_dirs, tokenizers, hf_greedy):
    node, store, (admin_server, api_server) = cluster
    client = openai_client(api_server)
    admin = httpx.Client(
        base_url=admin_server.url, timeout=120, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    lister = httpx.Client(base_url=api_server.url, timeout=30)
    assert [m.id for m in client.models.list().data] == [SERVED]  # the configured model is the registry
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve(ADDED)

    # A wrong or missing admin key is refused like a wrong API key, in the OpenAI error format.
    body = {"name": ADDED, "path": str(model_dirs[ADDED]), "ttft_s": 5.0, "priority": 2, "pinned": True}
    for headers in ({"Authorization": "Bearer wrong"}, {}):
        refused = httpx.post(f"{admin_server.url}/v1/admin/models", json=body, headers=headers)
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["code"] == "invalid_api_key"
        assert "admin key" in refused.json()["error"]["message"]
    assert card(lister, ADDED) is None and store.registered_model(ADDED) is None

    # The other model streams through all that follows.
    stream_text: list[str] = []
    stream_ended = threading.Event()
    first_chunk = threading.Event()

    def stream() -> None:
        chunks = client.completions.create(
            model=SERVED, prompt=PROMPT, max_tokens=LONG_TOKENS, stream=True, **GREEDY
        )
        for chunk in chunks:
            stream_text.append(chunk.choices[0].text if chunk.choices else "")
            first_chunk.set()
        stream_ended.set()

    streamer = threading.Thread(target=stream)
    streamer.start()
    assert first_chunk.wait(SETTLE_TIMEOUT_S)

    # While it is added, the model is listed as registered (on disk, loading) or in the host cache already.
    seen: list[str] = []
    adding = threading.Event()

    def watch() -> None:
        while adding.is_set():
            found = card(lister, ADDED)
            if found is not None and (not seen or seen[-1] != found["state"]):
                seen.append(found["state"])
            time.sleep(POLL_S)

    adding.set()
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        added = admin.post("/v1/admin/models", json=body)
    finally:
        adding.clear()
        watcher.join()
    assert added.status_code == 201, added.text
    assert not stream_ended.is_set() or stream_text, "the stream ran while the model was added"
    created = added.json()
    assert created["id"] == ADDED and created["state"] == HOST
    assert created["settings"] == {
        "path": str(model_dirs[ADDED]),
        "ttft_s": 5.0,
        "tbt_s": None,
        "priority": 2,
        "pinned": True,
    }
    assert set(seen) <= {DISK, LOADING, HOST}, seen
    assert node.config.scheduler.slo(ADDED).ttft_s == 5.0  # its SLO steers the node's scheduling
    again = admin.post("/v1/admin/models", json=body)
    assert again.status_code == 400 and again.json()["error"]["param"] == "name"

    # Served at once, exactly, by the other api server too; then it is on the device.
    answer = client.completions.create(model=ADDED, prompt=PROMPT, max_tokens=TOKENS, **GREEDY)
    assert answer.choices[0].text == greedy_text(model_dirs, tokenizers, hf_greedy, ADDED, TOKENS)
    on_device = wait_for_state(lister, ADDED, DEVICE)
    assert {"node", "instance", "state"} <= on_device["locations"][0].keys()
    assert any(location["instance"] for location in on_device["locations"])
    assert client.models.retrieve(ADDED).id == ADDED

    # The other model's stream is exactly what it would have been alone.
    streamer.join(SETTLE_TIMEOUT_S)
    assert stream_ended.is_set()
    assert "".join(stream_text) == greedy_text(model_dirs, tokenizers, hf_greedy, SERVED, LONG_TOKENS)

    # Removal drains: a request in flight finishes, then the model is gone for every client.
    in_flight = client.completions.create(
        model=ADDED, prompt=PROMPT, max_tokens=LONG_TOKENS, stream=True, **GREEDY
    )
    first = next(iter(in_flight))
    removed = admin.delete(f"/v1/admin/models/{ADDED}")
    assert removed.status_code == 200, removed.text
    assert removed.json() == {"id": ADDED, "object": "model", "deleted": True}
    rest = "".join(chunk.choices[0].text for chunk in in_flight if chunk.choices)
    expected = greedy_text(model_dirs, tokenizers, hf_greedy, ADDED, LONG_TOKENS)
    assert first.choices[0].text + rest == expected
    assert ADDED not in node.models and store.registered_model(ADDED) is None
    assert card(admin, ADDED) is None  # at once where it was removed; elsewhere within the catalog's TTL
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while card(lister, ADDED) is not None:
        assert time.monotonic() < deadline, "the removed model is still listed"
        time.sleep(POLL_S)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=ADDED, prompt=PROMPT, max_tokens=TOKENS)
    assert admin.delete(f"/v1/admin/models/{ADDED}").status_code == 404
    assert [m.id for m in client.models.list().data] == [SERVED]


def test_a_model_that_cannot_be_loaded_is_refused_and_not_registered(cluster, tmp_path):
    _, store, (admin_server, _) = cluster
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    missing = str(tmp_path / "no-such-model")
    refused = httpx.post(
        f"{admin_server.url}/v1/admin/models", json={"name": "ghost", "path": missing}, headers=headers
    )
    assert refused.status_code in (400, 404), refused.text
    assert store.registered_model("ghost") is None
    bad = httpx.post(
        f"{admin_server.url}/v1/admin/models",
        json={"name": "x", "path": missing, "pinned": "yes"},
        headers=headers,
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "pinned"


def test_without_an_admin_key_the_admin_routes_do_not_exist():
    with ServerThread(build_app(ClusterBackend(MemoryStore()))) as server:
        for method, path in (("POST", "/v1/admin/models"), ("DELETE", "/v1/admin/models/llama")):
            answer = httpx.request(
                method, f"{server.url}{path}", headers={"Authorization": "Bearer anything"}
            )
            assert answer.status_code == 404 and answer.json()["error"]["type"] == "invalid_request_error"


def test_a_single_process_server_adds_and_removes_models_too(model_dirs, tokenizers, hf_greedy):
    memory = MemoryConfig(host_model_cache_bytes=HOST_CACHE_BYTES)
    config = EngineConfig(kv_cache_bytes=KV_BYTES)
    engine = LLMEngine(models={SERVED: model_dirs[SERVED]}, config=config, memory=memory, progress=False)
    backend = EngineBackend(engine)
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    try:
        with (
            ServerThread(build_app(backend, admin_key=ADMIN_KEY)) as server,
            httpx.Client(base_url=server.url, timeout=60) as http,
        ):
            added = http.post(
                "/v1/admin/models", json={"name": ADDED, "path": str(model_dirs[ADDED])}, headers=headers
            )
            # Not pinned: registered, its weights read from disk when its first request needs them.
            assert added.status_code == 201 and added.json()["state"] == DISK, added.text
            client = openai_client(server)
            answer = client.completions.create(model=ADDED, prompt=PROMPT, max_tokens=TOKENS, **GREEDY)
            assert answer.choices[0].text == greedy_text(model_dirs, tokenizers, hf_greedy, ADDED, TOKENS)
            assert card(http, ADDED)["state"] == DEVICE
            assert http.delete(f"/v1/admin/models/{ADDED}", headers=headers).status_code == 200
            assert card(http, ADDED) is None
            with pytest.raises(openai.NotFoundError):
                client.completions.create(model=ADDED, prompt=PROMPT, max_tokens=TOKENS)
    finally:
        backend.close()
