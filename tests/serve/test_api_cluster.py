"""The OpenAI API end to end over real nodes: a node's processes, a real uvicorn server, the official client.

A user sees: the models of the live nodes behind one endpoint; completions and chat, streamed or not,
give exactly transformers' greedy tokens through the node; a failed node's requests get a 503; a
client that goes away frees its request on the node; each request is recorded in the store.

The suite runs twice: on one machine (metadata in process, one api server), and as a cluster sharing a
real `redis-server` (two api servers and one node; the `client` fixture talks to one api server and
the `http` fixture to the other, so every kind of request is served by both). The HTTP layer itself
(parsing, validation, errors, auth, streams) is tested in process, in test_api_server.py.
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from aegaeon.config import MIB, EngineConfig, NodeConfig
from aegaeon.engine.tokenizer import Tokenizer
from aegaeon.instance.node import Node
from aegaeon.serve.api_server import build_app
from aegaeon.serve.backend import ClusterBackend
from aegaeon.serve.metadata import MemoryStore, RedisStore, RequestState
from aegaeon.serve.node_server import NodeServer
from tests.serve.api_checks import GREEDY, MODELS, TOKENS, check_concurrent_requests, expected_text
from tests.serve.http_server import ServerThread
from tests.serve.redis_server import RedisServer

KV_BYTES = 4 * MIB
DRAIN_TIMEOUT_S = 20.0
POLL_S = 0.02


@pytest.fixture(scope="module")
def model_dirs(five_model_dirs):
    return {name: five_model_dirs[name] for name in MODELS}


@pytest.fixture(scope="module")
def tokenizers(model_dirs) -> dict[str, Tokenizer]:
    return {name: Tokenizer.from_pretrained(path) for name, path in model_dirs.items()}


@pytest.fixture(scope="module")
def node(model_dirs, profile_path):
    config = NodeConfig(profile_path=str(profile_path), engine=EngineConfig(kv_cache_bytes=KV_BYTES))
    with Node(model_dirs, config, progress=False) as node:
        yield node


class Cluster:
    """The node served over a metadata store, and the api servers in front of it."""

    def __init__(self, node: Node, stores: list, api_servers: list[ServerThread], node_server: NodeServer):
        self.node = node
        self.stores = stores
        self.api_servers = api_servers
        self.node_server = node_server

    @property
    def store(self):
        return self.stores[0]


@pytest.fixture(scope="module", params=["memory", "redis"])
def cluster(request, node):
    if request.param == "memory":
        stores = [MemoryStore()]
        redis_server = None
    else:
        redis_server = RedisServer().__enter__()
        stores = [RedisStore(redis_server.url) for _ in range(3)]  # the node's, and each api server's
    node_server = NodeServer(node, stores[0])
    api_servers = [ServerThread(build_app(ClusterBackend(store))) for store in stores[-2:]]
    try:
        for server in api_servers:
            server.__enter__()
        yield Cluster(node, stores, api_servers, node_server)
    finally:
        for server in api_servers:
            server.__exit__(None, None, None)
        node_server.close()
        for store in stores:
            store.close()
        if redis_server is not None:
            redis_server.__exit__(None, None, None)


@pytest.fixture(scope="module")
def server(cluster) -> ServerThread:
    return cluster.api_servers[0]


@pytest.fixture(scope="module")
def client(cluster) -> openai.OpenAI:
    url = cluster.api_servers[0].url
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(cluster):
    with httpx.Client(base_url=cluster.api_servers[-1].url, timeout=60) as http:
        yield http


def wait_idle(node: Node) -> None:
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while node.live and time.monotonic() < deadline:
        time.sleep(POLL_S)
    assert not node.live, list(node.live)


# -- the models of the live nodes, generation through them ----------------------------------------


def test_models_are_listed_with_their_context(client, http, node):
    listed = client.models.list()
    assert [m.id for m in listed.data] == list(MODELS)
    assert all(m.object == "model" and m.owned_by == "aegaeon" and m.created > 0 for m in listed.data)
    raw = http.get("/v1/models").json()
    assert raw["object"] == "list"
    assert [m["max_model_len"] for m in raw["data"]] == [node.models[name].max_model_len for name in MODELS]
    assert client.models.retrieve("qwen2").id == "qwen2"
    missing = http.get("/v1/models/gpt-9")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


def test_without_a_live_node_the_api_is_unhealthy_and_says_why():
    with (
        ServerThread(build_app(ClusterBackend(MemoryStore()))) as server,
        httpx.Client(base_url=server.url) as http,
    ):
        health = http.get("/health")
        assert health.status_code == 503
        assert "no node is serving" in health.json()["error"]["message"]
        missing = http.post("/v1/completions", json={"model": "llama", "prompt": "x"})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_concurrent_streaming_and_plain_requests_agree(client, node, model_dirs, tokenizers, hf_greedy):
    check_concurrent_requests(client, model_dirs, tokenizers, hf_greedy)
    wait_idle(node)


def test_a_failed_node_refuses_requests_with_a_503(http, node):
    node.error = RuntimeError("instance colocated-0 died")  # what Node.instance_failed records
    try:
        refused = http.post("/v1/completions", json={"model": "llama", "prompt": "x"})
        assert refused.status_code == 503
        assert "colocated-0 died" in refused.json()["error"]["message"]
    finally:
        node.error = None
    assert http.post("/v1/completions", json={"model": "llama", "prompt": "x", "max_tokens": 1}).is_success


# -- disconnects -------------------------------------------------------------------------------------

# Long enough (n * tokens) that the request is still running when the client hangs up.
LONG_REQUEST = {
    "model": "llama",
    "prompt": "Go",
    "max_tokens": 500,
    "n": 16,
    "ignore_eos": True,
    "temperature": 1,
}


IMPATIENT_S = 0.3


def _finished_ids(node: Node) -> set[str]:
    return {request.request_id for request in node.completed}


def test_a_client_that_leaves_mid_stream_aborts_its_request(http, node):
    with http.stream("POST", "/v1/completions", json=LONG_REQUEST | {"stream": True}) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        request_id = json.loads(first.removeprefix("data: "))["id"]
        assert request_id in node.live
    wait_idle(node)
    assert request_id not in _finished_ids(node)  # aborted, not run to the end


def test_a_client_that_times_out_aborts_its_request(server, node):
    finished_before = len(node.completed)
    with (
        httpx.Client(base_url=server.url, timeout=IMPATIENT_S) as impatient,
        pytest.raises(httpx.ReadTimeout),
    ):
        impatient.post("/v1/completions", json=LONG_REQUEST)
    wait_idle(node)
    assert len(node.completed) == finished_before  # aborted requests are not among the completed


# -- the cluster: routing, records -------------------------------------------------------------------


def test_either_api_server_serves_a_request_with_the_same_output(cluster, model_dirs, tokenizers, hf_greedy):
    prompt = [5, 6, 7, 8]
    expected = expected_text(model_dirs, tokenizers, hf_greedy, "mistral", prompt)
    for server in cluster.api_servers:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
        answer = client.completions.create(model="mistral", prompt=prompt, max_tokens=TOKENS, **GREEDY)
        assert answer.choices[0].text == expected


def test_each_request_is_recorded_in_the_store_with_its_node_instance_and_tokens(cluster, client):
    answer = client.completions.create(model="qwen2", prompt="Record me", max_tokens=TOKENS, **GREEDY)
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    record = cluster.store.get_request(answer.id)
    while (record is None or record.state != RequestState.FINISHED) and time.monotonic() < deadline:
        time.sleep(POLL_S)
        record = cluster.store.get_request(answer.id)
    assert record is not None and record.state == RequestState.FINISHED
    assert record.model == "qwen2" and record.node_id == cluster.node_server.node_id
    assert record.instance_id == f"{cluster.node_server.node_id}/colocated-0"
    assert record.prompt_tokens == answer.usage.prompt_tokens
    assert record.output_tokens == answer.usage.completion_tokens == len(record.output_token_ids)
    assert record.arrival_s <= record.first_token_s <= record.finished_s
    assert record.finish_reason == "length"
