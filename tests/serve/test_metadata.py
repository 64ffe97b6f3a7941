"""The metadata store: one behavioural suite over MemoryStore and RedisStore (a real redis-server), then
what only Redis has: several clients, key prefixes, passwords, TLS, restarts."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis

from aegaeon.serve.metadata import (
    LOAD_KV_USAGE,
    LOAD_RUNNING,
    LOAD_WAITING,
    MODEL_DRAINING,
    InstanceInfo,
    MemoryStore,
    MetadataStore,
    MetadataStoreError,
    ModelRecord,
    NodeInfo,
    RedisStore,
    RequestRecord,
    RequestState,
    StoreAuthenticationError,
    StoreUnavailableError,
    open_store,
)
from tests.serve.redis_server import RedisServer, redis_server_fixture  # noqa: F401

# Short so that expiry tests take a fraction of a second; EXPIRE_WAIT_S leaves room for slow machines.
SHORT_TTL_S = 0.3
EXPIRE_WAIT_S = 0.6

StoreFactory = Callable[..., MetadataStore]


@pytest.fixture(params=["memory", "redis"])
def make_store(request: pytest.FixtureRequest) -> Iterator[StoreFactory]:
    """`make_store(**kwargs)`: a store of the parametrized kind, closed after the test.

    Every Redis store of one test shares one fresh server and one key prefix (so it is another client of
    the same store); every MemoryStore is its own.
    """
    opened: list[MetadataStore] = []
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        prefix = f"test-{uuid.uuid4().hex[:8]}"

        def make(**kwargs) -> MetadataStore:
            opened.append(RedisStore(server.url, key_prefix=prefix, **kwargs))
            return opened[-1]

    else:

        def make(**kwargs) -> MetadataStore:
            opened.append(MemoryStore(**kwargs))
            return opened[-1]

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def store(make_store: StoreFactory) -> MetadataStore:
    return make_store()


def instance(instance_id: str, node_id: str = "node-a", **kwargs) -> InstanceInfo:
    defaults = dict(role="colocated", device="cpu", address=f"ipc:///tmp/{instance_id}", started_at=100.5)
    return InstanceInfo(instance_id, node_id, **{**defaults, **kwargs})


def full_record(request_id: str = "req-1", **kwargs) -> RequestRecord:
    values = dict(
        model="llama",
        state=RequestState.DECODING,
        api_server="api-0",
        node_id="node-a",
        instance_id="node-a/decode-0",
        arrival_s=1000.25,
        first_token_s=1000.5,
        finished_s=None,
        prompt_tokens=7,
        output_tokens=3,
        output_token_ids=[5, 0, 17],
        finish_reason=None,
    )
    return RequestRecord(request_id, **{**values, **kwargs})


# ---- instances -------------------------------------------------------------------------------------------


def test_register_heartbeat_remove(store: MetadataStore) -> None:
    info = instance("i-0", models_resident=["llama"])
    store.register_instance(info)
    (status,) = store.instances()
    assert status.info == info
    assert status.load == {}
    assert abs(status.last_seen - time.time()) < 5  # the store's clock (Redis: the server's), wall time

    time.sleep(0.01)
    load = {LOAD_WAITING: 2, LOAD_RUNNING: 5, LOAD_KV_USAGE: 0.25}
    assert store.heartbeat("i-0", load, models_resident=["llama", "qwen"])
    beat = store.get_instance("i-0")
    assert beat is not None
    assert beat.last_seen > status.last_seen
    assert beat.load == {LOAD_WAITING: 2.0, LOAD_RUNNING: 5.0, LOAD_KV_USAGE: 0.25}
    assert beat.busy == 7.0
    assert beat.info.models_resident == ["llama", "qwen"]

    assert store.heartbeat("i-0")  # no load: the last one stays
    assert store.get_instance("i-0").load[LOAD_RUNNING] == 5.0

    assert not store.heartbeat("nobody")
    store.remove_instance("i-0")
    assert store.instances() == []
    assert store.get_instance("i-0") is None


def test_liveness_follows_heartbeats(store: MetadataStore) -> None:
    store.register_instance(instance("beating"))
    store.register_instance(instance("silent"))
    deadline = time.monotonic() + EXPIRE_WAIT_S
    while time.monotonic() < deadline:
        store.heartbeat("beating", {LOAD_WAITING: 0})
        time.sleep(0.05)
    alive = [s.info.instance_id for s in store.instances(alive_within_s=SHORT_TTL_S)]
    assert alive == ["beating"]
    # Without a window every registered instance is listed; its last_seen says how stale it is.
    assert [s.info.instance_id for s in store.instances()] == ["beating", "silent"]


def test_silent_instance_leaves_registry_after_instance_ttl(make_store: StoreFactory) -> None:
    store = make_store(instance_ttl_s=SHORT_TTL_S)
    store.register_instance(instance("i-0"))
    store.register_instance(instance("i-1"))
    time.sleep(EXPIRE_WAIT_S)
    # Both records expired. i-1's heartbeat writes it back (this client registered it); i-0 stays gone.
    assert store.heartbeat("i-1")
    assert [s.info.instance_id for s in store.instances()] == ["i-1"]


# ---- nodes and placement ---------------------------------------------------------------------------------


def test_nodes_and_placements(store: MetadataStore) -> None:
    a = NodeInfo("node-a", "10.0.0.1:7000", models=["llama", "qwen"], devices=2, host_cache_bytes=1 << 30)
    b = NodeInfo("node-b", "10.0.0.2:7000", models=["llama"], registered_at=5.0)
    store.register_node(b)
    store.register_node(a)
    assert store.nodes() == [a, b]
    assert store.get_node("node-b") == b and store.get_node("nope") is None

    store.place_model("llama", "node-b")
    store.place_model("llama", "node-a")
    store.place_model("qwen", "node-a")
    assert store.placements("llama") == ["node-a", "node-b"]
    assert store.placements("qwen") == ["node-a"]
    assert store.placements("mistral") == []

    store.unplace_model("llama", "node-b")
    assert store.placements("llama") == ["node-a"]

    a2 = NodeInfo("node-a", "10.0.0.1:7001", models=["qwen"])
    store.register_node(a2)  # replaces
    assert store.get_node("node-a") == a2

    store.remove_node("node-a")
    assert store.nodes() == [b]
    assert store.placements("llama") == [] and store.placements("qwen") == []


def test_model_registry(make_store: StoreFactory) -> None:
    store = make_store()
    other = make_store() if isinstance(store, RedisStore) else store  # Redis: another client of it
    llama = ModelRecord("llama", "/models/llama", registered_at=10.0)
    tuned = ModelRecord(
        "qwen", "/models/qwen", ttft_s=2.5, tbt_s=0.1, priority=3, pinned=True, registered_at=11.0
    )
    store.put_model(tuned)
    assert other.add_model_if_absent(llama)
    assert not other.add_model_if_absent(ModelRecord("llama", "/elsewhere"))  # the first registration stays
    assert store.registered_models() == [llama, tuned]  # by name, every field as written
    assert other.registered_model("qwen") == tuned and other.registered_model("nope") is None

    store.put_model(ModelRecord("qwen", "/models/qwen", state=MODEL_DRAINING, registered_at=11.0))
    assert (
        other.registered_model("qwen").state == MODEL_DRAINING and not other.registered_model("qwen").pinned
    )
    other.remove_model("qwen")
    assert [m.name for m in store.registered_models()] == ["llama"]
    store.remove_model("qwen")  # removing what is gone is fine


def test_pick_node_by_placement_then_ability_then_load(store: MetadataStore) -> None:
    store.register_node(NodeInfo("node-a", "a", models=["llama", "qwen"]))
    store.register_node(NodeInfo("node-b", "b", models=["llama", "qwen", "mistral"]))
    store.register_node(NodeInfo("node-c", "c", models=["gemma"]))  # no live instance
    for node in ("node-a", "node-b"):
        store.register_instance(instance(f"{node}/0", node))
        store.register_instance(instance(f"{node}/1", node))
    store.heartbeat("node-a/0", {LOAD_WAITING: 4, LOAD_RUNNING: 4})
    store.heartbeat("node-b/0", {LOAD_WAITING: 1, LOAD_RUNNING: 1})
    store.place_model("llama", "node-a")
    store.place_model("llama", "node-b")
    store.place_model("qwen", "node-a")

    assert store.pick_node("llama") == "node-b"  # both hold it; b is less loaded
    assert store.pick_node("qwen") == "node-a"  # only a holds it, however loaded
    assert store.pick_node("mistral") == "node-b"  # nobody holds it; b can load it
    assert store.pick_node("gemma") is None  # only a dead node could
    assert store.pick_node("unknown") is None
    # An api server's own requests in flight, not yet in any heartbeat, count as load too.
    assert store.pick_node("llama", extra_load={"node-b": 5.0}) == "node-a"

    time.sleep(EXPIRE_WAIT_S)
    store.heartbeat("node-a/0")
    assert store.pick_node("llama", alive_within_s=SHORT_TTL_S) == "node-a"  # b went silent


# ---- request records -------------------------------------------------------------------------------------


def test_request_round_trip(store: MetadataStore) -> None:
    record = full_record()
    store.put_request(record)
    assert store.get_request("req-1") == record
    minimal = RequestRecord("req-2", "qwen", state="queued")
    store.put_request(minimal)
    got = store.get_request("req-2")
    assert got.state is RequestState.QUEUED
    assert got.node_id is None and got.output_token_ids == [] and got.output_tokens == 0
    assert got.arrival_s == minimal.arrival_s
    assert store.get_request("nope") is None

    store.put_request(full_record(model="other"))  # replaces the whole record
    assert store.get_request("req-1").model == "other"
    store.delete_request("req-1")
    assert store.get_request("req-1") is None
    assert [r.request_id for r in store.requests()] == ["req-2"]


def test_update_request_sets_only_the_named_fields(store: MetadataStore) -> None:
    store.put_request(full_record())
    assert store.update_request("req-1", state="finished", finished_s=1001.0, finish_reason="stop")
    got = store.get_request("req-1")
    assert got == full_record(state=RequestState.FINISHED, finished_s=1001.0, finish_reason="stop")
    assert store.update_request("req-1", instance_id=None)  # None clears a field
    assert store.get_request("req-1").instance_id is None

    assert not store.update_request("nope", state="failed")
    assert store.get_request("nope") is None  # an update does not create a record
    with pytest.raises(TypeError, match="colour"):
        store.update_request("req-1", colour="blue")
    with pytest.raises(TypeError, match="request_id"):
        store.update_request("req-1", request_id="other")
    with pytest.raises(ValueError):
        store.update_request("req-1", state="sleeping")


def test_append_output(store: MetadataStore) -> None:
    store.put_request(RequestRecord("r", "llama", arrival_s=1.0))
    assert store.append_output("r", [4], first_token_s=2.0)
    assert store.append_output("r", [5, 6], first_token_s=3.0)  # the first first_token_s stays
    got = store.get_request("r")
    assert got.output_token_ids == [4, 5, 6] and got.output_tokens == 3 and got.first_token_s == 2.0
    assert not store.append_output("missing", [1])


def test_concurrent_updates_of_different_fields_do_not_clobber(make_store: StoreFactory) -> None:
    writer_a, writer_b = make_store(), None
    writer_b = writer_a if isinstance(writer_a, MemoryStore) else make_store()
    writer_a.put_request(RequestRecord("r", "llama"))
    tokens = 100

    def decode() -> None:
        for token in range(tokens):
            writer_a.append_output("r", [token])

    def move() -> None:
        for step in range(tokens):
            writer_b.update_request("r", instance_id=f"i-{step}", state=RequestState.DECODING)

    threads = [threading.Thread(target=decode), threading.Thread(target=move)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    got = writer_a.get_request("r")
    assert got.output_token_ids == list(range(tokens)) and got.output_tokens == tokens
    assert got.instance_id == f"i-{tokens - 1}" and got.state is RequestState.DECODING


def test_requests_filters_by_state_and_model(store: MetadataStore) -> None:
    store.put_request(RequestRecord("c", "llama", state="decoding", arrival_s=3.0))
    store.put_request(RequestRecord("a", "llama", state="queued", arrival_s=1.0))
    store.put_request(RequestRecord("b", "qwen", state="queued", arrival_s=2.0))
    assert [r.request_id for r in store.requests()] == ["a", "b", "c"]  # by arrival
    assert [r.request_id for r in store.requests(state="queued")] == ["a", "b"]
    assert [r.request_id for r in store.requests(model="llama")] == ["a", "c"]
    assert [r.request_id for r in store.requests(RequestState.QUEUED, "llama")] == ["a"]
    assert store.requests(state="failed") == []


def test_finished_records_expire(make_store: StoreFactory) -> None:
    store = make_store(finished_ttl_s=SHORT_TTL_S)
    store.put_request(RequestRecord("running", "llama", state="decoding"))
    store.put_request(RequestRecord("finished", "llama", state="decoding"))
    store.put_request(RequestRecord("aborted-at-once", "llama", state="aborted"))
    store.put_request(RequestRecord("revived", "llama", state="failed"))
    store.update_request("finished", state=RequestState.FINISHED, finish_reason="length")
    store.update_request("revived", state="queued")  # a retried request is in flight again: no expiry
    assert {r.request_id for r in store.requests()} == {"running", "finished", "aborted-at-once", "revived"}
    time.sleep(EXPIRE_WAIT_S)
    assert store.get_request("finished") is None and store.get_request("aborted-at-once") is None
    assert {r.request_id for r in store.requests()} == {"running", "revived"}
    assert not store.update_request("finished", state="failed")


def test_an_in_process_store_forgets_expired_records_nobody_looks_up() -> None:
    """Records of finished requests leave memory after their TTL even if nothing reads them again
    (a long-running server writes new ones, which sweeps the expired)."""
    store = MemoryStore(finished_ttl_s=SHORT_TTL_S)
    for i in range(50):
        store.put_request(RequestRecord(f"old-{i}", "llama", state="finished"))
    store.put_request(RequestRecord("running", "llama", state="decoding"))
    time.sleep(EXPIRE_WAIT_S)
    store.put_request(RequestRecord("new", "llama", state="finished"))
    assert set(store._requests) == {"running", "new"}  # noqa: SLF001 - what the process holds


def test_open_store() -> None:
    assert isinstance(open_store(None), MemoryStore)
    memory = open_store("memory://", key_prefix="ignored", finished_ttl_s=5)
    assert isinstance(memory, MemoryStore) and memory.finished_ttl_s == 5
    with pytest.raises(ValueError, match="redis://"):
        open_store("http://localhost:6379")


# ---- Redis only ------------------------------------------------------------------------------------------


def test_two_api_servers_share_records(redis_server: RedisServer) -> None:
    api_a = open_store(redis_server.url)
    api_b = open_store(redis_server.url)
    node = open_store(redis_server.url)
    api_a.put_request(RequestRecord("r1", "llama", api_server="api-a"))
    api_a.close()  # the api server that accepted r1 is gone; its record is not

    assert api_b.get_request("r1").api_server == "api-a"
    assert node.get_request("r1").state is RequestState.QUEUED
    node.update_request("r1", state="decoding", node_id="node-a")
    node.append_output("r1", [1, 2])
    assert api_b.get_request("r1").output_token_ids == [1, 2]
    api_b.put_request(RequestRecord("r2", "qwen", api_server="api-b"))
    assert [r.request_id for r in node.requests()] == ["r1", "r2"]

    node.register_node(NodeInfo("node-a", "a", models=["llama"]))
    node.register_instance(instance("node-a/0"))
    assert api_b.pick_node("llama") == "node-a"
    api_b.close()
    node.close()


def test_key_prefixes_isolate_clusters(redis_server: RedisServer) -> None:
    one = RedisStore(redis_server.url, key_prefix="cluster-one")
    two = RedisStore(redis_server.url, key_prefix="cluster-two")
    one.register_node(NodeInfo("n", "a", models=["llama"]))
    one.register_instance(instance("i"))
    one.place_model("llama", "n")
    one.put_request(RequestRecord("r", "llama"))
    assert two.nodes() == [] and two.instances() == [] and two.placements("llama") == []
    assert two.get_request("r") is None and two.requests() == []
    assert one.get_request("r").model == "llama"
    raw = redis.Redis.from_url(redis_server.url, decode_responses=True)
    assert all(key.startswith("cluster-one:") for key in raw.keys("*"))
    raw.close()
    one.close()
    two.close()


def test_password_protected_redis() -> None:
    password = "s3cret pw/with:odd@chars"
    with RedisServer(password=password) as server:
        store = open_store(server.url)
        store.put_request(RequestRecord("r", "llama"))
        assert store.get_request("r").model == "llama"
        store.close()

        for url in (server.url.replace("s3cret", "wrong"), f"redis://127.0.0.1:{server.port}/0"):
            start = time.monotonic()
            with pytest.raises(StoreAuthenticationError, match=rf"127\.0\.0\.1:{server.port}") as error:
                open_store(url)
            assert time.monotonic() - start < 1.0  # a refused password is not retried with backoff
            assert "wrong" not in str(error.value) and "password" in str(error.value)


def test_tls_redis() -> None:
    with RedisServer(tls=True) as server:
        assert server.url.startswith("rediss://")
        store = open_store(server.url)
        store.put_request(RequestRecord("r", "llama"))
        assert store.get_request("r").model == "llama"
        assert store.where.startswith("rediss://")
        store.close()


def test_unreachable_redis_fails_clearly() -> None:
    with RedisServer() as server:
        store = RedisStore(server.url, retries=1)
        url = server.url
    # Gone for good: once the (here: one) retry is spent, operations raise a store error naming the server.
    with pytest.raises(StoreUnavailableError, match=r"cannot reach Redis at redis://127\.0\.0\.1:\d+/0"):
        store.requests()
    with pytest.raises(MetadataStoreError, match="cannot reach Redis"):
        RedisStore(url, retries=1)


def test_survives_redis_restart(redis_server: RedisServer) -> None:
    node = RedisStore(redis_server.url)
    api = RedisStore(redis_server.url)
    node.register_node(NodeInfo("node-a", "a", models=["llama"]))
    node.place_model("llama", "node-a")
    node.register_instance(instance("node-a/0"))
    api.put_request(RequestRecord("r1", "llama"))

    redis_server.restart()  # no persistence: Redis comes back empty, every client's connections broken
    assert api.get_request("r1") is None  # reconnected; the data is gone (docs/metadata.md: use AOF)
    api.put_request(RequestRecord("r2", "llama"))
    assert api.get_request("r2").model == "llama"
    # The node's next heartbeat notices its instance is gone and writes back all it registered.
    assert node.heartbeat("node-a/0", {LOAD_WAITING: 1})
    assert [n.node_id for n in api.nodes()] == ["node-a"]
    assert api.placements("llama") == ["node-a"]
    assert api.get_instance("node-a/0").load == {LOAD_WAITING: 1.0}
    assert api.pick_node("llama") == "node-a"

    # A command issued while Redis is down waits (bounded backoff) and goes through once it is back.
    redis_server.stop()
    restarter = threading.Timer(0.5, redis_server.start)
    restarter.start()
    api.put_request(RequestRecord("r3", "llama"))
    restarter.join()
    assert node.get_request("r3").model == "llama"
    node.close()
    api.close()


def test_import_is_torch_free() -> None:
    heavy = ("torch", "aegaeon.engine")
    code = f"import sys, aegaeon.serve.metadata; sys.exit(any(name in sys.modules for name in {heavy}))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
