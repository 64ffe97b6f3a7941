"""The metadata store: instances and their heartbeats, nodes and model placement, and every request's record.

One interface, `MetadataStore`, two implementations: `MemoryStore` (in process, the default) and
`RedisStore` (shared by several api servers and nodes, so a request outlives the process that accepted
it). `open_store(url)` picks one. The Redis key schema and the liveness rule are in docs/metadata.md.

Torch-free and engine-free: api servers import this without loading a model.
"""

from __future__ import annotations

import copy
import enum
import functools
import json
import threading
import time
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

DEFAULT_KEY_PREFIX = "aegaeon"
# A finished, failed or aborted request's record is kept this long, then dropped.
DEFAULT_FINISHED_TTL_S = 3600.0
# An instance silent this long is dropped from the registry (liveness itself is `alive_within_s`).
DEFAULT_INSTANCE_TTL_S = 300.0
# The liveness window `pick_node` uses: a few missed heartbeats of a node beating every second or two.
DEFAULT_ALIVE_WITHIN_S = 10.0

# Redis client: a command that meets a connection error reconnects and retries with exponential backoff,
# RETRIES times (about 5 s in all), long enough to ride out a Redis restart, short enough to fail clearly.
SOCKET_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 2.0
RETRIES = 8
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 1.0
# A connection idle this long is PINGed before use, so a dead one is replaced before a command is lost on it.
HEALTH_CHECK_INTERVAL_S = 30

# Keys of the load summary a heartbeat carries.
LOAD_WAITING = "waiting"  # requests queued on the instance
LOAD_RUNNING = "running"  # requests in its running batches
LOAD_KV_USAGE = "kv_usage"  # fraction of its KV blocks in use, 0..1

T = TypeVar("T")


class MetadataStoreError(RuntimeError):
    """The store cannot be reached or refused us."""


class StoreAuthenticationError(MetadataStoreError):
    """Redis rejected the password (or wanted one)."""


class StoreUnavailableError(MetadataStoreError):
    """Redis did not answer, even after the reconnect retries."""


class RequestState(str, enum.Enum):
    QUEUED = "queued"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    FINISHED = "finished"
    FAILED = "failed"
    ABORTED = "aborted"

    @property
    def terminal(self) -> bool:
        """Whether the request is done (its record then expires)."""
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({RequestState.FINISHED, RequestState.FAILED, RequestState.ABORTED})


@dataclass
class InstanceInfo:
    """What an instance registers; wall-clock times are seconds since the epoch."""

    instance_id: str
    node_id: str
    role: str  # prefill | decode | colocated
    device: str  # "cuda:0", "cpu"
    address: str  # where its IPC endpoint listens
    models_resident: list[str] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)


@dataclass
class InstanceStatus:
    """A registered instance with its last heartbeat (store clock) and load summary."""

    info: InstanceInfo
    last_seen: float
    load: dict[str, float] = field(default_factory=dict)

    @property
    def busy(self) -> float:
        """Requests waiting plus running: what routing balances."""
        return self.load.get(LOAD_WAITING, 0.0) + self.load.get(LOAD_RUNNING, 0.0)


@dataclass
class NodeInfo:
    """One machine: the models it can serve (load from its host cache or disk) and its capacity."""

    node_id: str
    address: str
    models: list[str] = field(default_factory=list)
    # Per model: its local directory (where api servers find its tokenizer) and its context length.
    model_dirs: dict[str, str] = field(default_factory=dict)
    max_model_lens: dict[str, int] = field(default_factory=dict)
    devices: int = 1  # instances it runs
    host_cache_bytes: int = 0  # capacity of its host model cache
    registered_at: float = field(default_factory=time.time)


@dataclass
class RequestRecord:
    """One request's record; times are wall-clock seconds since the epoch, None until they happen."""

    request_id: str
    model: str
    state: RequestState = RequestState.QUEUED
    api_server: str = ""
    node_id: str | None = None
    instance_id: str | None = None
    arrival_s: float = field(default_factory=time.time)
    first_token_s: float | None = None
    finished_s: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0  # count
    output_token_ids: list[int] = field(default_factory=list)  # so far
    finish_reason: str | None = None
    error: str | None = None  # why it failed


UPDATABLE_REQUEST_FIELDS = frozenset(f.name for f in fields(RequestRecord)) - {"request_id"}


# ---- codec: a dataclass <-> a flat str -> str mapping (a Redis hash) -------------------------------------
# Strings are stored as they are, numbers as decimal text (so HINCRBY works), enums by value, lists and
# dicts as compact JSON; a None field is absent. Decoding follows the dataclass's type hints.


@functools.cache
def _field_kinds(cls: type) -> dict[str, Any]:
    """Field name -> the plain type to decode to (Optional stripped, list[int] -> list)."""
    kinds = {}
    for name, hint in typing.get_type_hints(cls).items():
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        kinds[name] = typing.get_origin(hint) or hint
    return kinds


def _encode(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, list, tuple, dict)):
        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, (int, float)):
        return repr(value)
    raise TypeError(f"cannot store {type(value).__name__} {value!r}")


def _decode(kind: Any, raw: str) -> Any:
    if kind is str:
        return raw
    if kind in (int, float):
        return kind(raw)
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return kind(raw)
    return json.loads(raw)


def _to_hash(record: Any) -> dict[str, str]:
    return {f.name: _encode(v) for f in fields(record) if (v := getattr(record, f.name)) is not None}


def _from_hash(cls: type, mapping: Mapping[str, str]) -> Any:
    """The dataclass from a hash; fields the hash lacks are None (or their default), extra ones ignored."""
    kinds = _field_kinds(cls)
    return cls(**{name: _decode(kinds[name], mapping[name]) for name in kinds if name in mapping})


def _coerce(cls: type, name: str, value: Any) -> Any:
    """A field's value as the store gives it back (the memory store matches the Redis one exactly)."""
    return None if value is None else _decode(_field_kinds(cls)[name], _encode(value))


def _check_update(request_fields: Mapping[str, Any]) -> None:
    unknown = set(request_fields) - UPDATABLE_REQUEST_FIELDS
    if unknown:
        raise TypeError(f"update_request: no updatable field(s) {sorted(unknown)}")


# ---- the interface ---------------------------------------------------------------------------------------


class MetadataStore(ABC):
    """Instances, nodes, placements and request records; every method is thread-safe."""

    def __init__(self, finished_ttl_s: float, instance_ttl_s: float) -> None:
        self.finished_ttl_s = finished_ttl_s
        self.instance_ttl_s = instance_ttl_s
        # What this client registered, replayed by `reregister` after the store lost it (a Redis restart).
        self._own_lock = threading.Lock()
        self._own_nodes: dict[str, NodeInfo] = {}
        self._own_instances: dict[str, InstanceInfo] = {}
        self._own_placements: set[tuple[str, str]] = set()

    # instances
    def register_instance(self, info: InstanceInfo) -> None:
        """Add or replace an instance; registering counts as a heartbeat (with an empty load)."""
        with self._own_lock:
            self._own_instances[info.instance_id] = copy.deepcopy(info)
        self._put_instance(info)

    def heartbeat(
        self,
        instance_id: str,
        load: Mapping[str, float] | None = None,
        models_resident: Iterable[str] | None = None,
    ) -> bool:
        """Mark the instance alive now, with its load summary (None keeps the last one).

        An instance this client registered but the store no longer knows (Redis restarted, or it was
        silent for `instance_ttl_s`) is written back, with the nodes and placements this client
        registered; other instances come back on their own heartbeats, so none looks alive that is not.
        False: the instance is unknown.
        """
        load = None if load is None else {key: float(value) for key, value in load.items()}
        resident = None if models_resident is None else list(models_resident)
        with self._own_lock:
            own = self._own_instances.get(instance_id)
            if own is not None and resident is not None:
                own.models_resident = list(resident)
        if self._beat(instance_id, load, resident):
            return True
        if own is None:
            return False
        self._replay(instance_ids=[instance_id])
        return self._beat(instance_id, load, resident)

    @abstractmethod
    def instances(self, alive_within_s: float | None = None) -> list[InstanceStatus]:
        """Registered instances, by id; with `alive_within_s`, only those that beat within that window."""

    def get_instance(self, instance_id: str) -> InstanceStatus | None:
        return next((s for s in self.instances() if s.info.instance_id == instance_id), None)

    def remove_instance(self, instance_id: str) -> None:
        with self._own_lock:
            self._own_instances.pop(instance_id, None)
        self._delete_instance(instance_id)

    # nodes and placement
    def register_node(self, info: NodeInfo) -> None:
        """Add or replace a node."""
        with self._own_lock:
            self._own_nodes[info.node_id] = copy.deepcopy(info)
        self._put_node(info)

    @abstractmethod
    def nodes(self) -> list[NodeInfo]:
        """Registered nodes, by id."""

    def get_node(self, node_id: str) -> NodeInfo | None:
        return next((n for n in self.nodes() if n.node_id == node_id), None)

    def remove_node(self, node_id: str) -> None:
        """Drop a node and its placements (its instances leave on their own, or age out)."""
        with self._own_lock:
            self._own_nodes.pop(node_id, None)
            self._own_placements = {p for p in self._own_placements if p[1] != node_id}
        self._delete_node(node_id)

    def place_model(self, model: str, node_id: str) -> None:
        """Record that `node_id` holds `model` (in its host cache or on a device)."""
        with self._own_lock:
            self._own_placements.add((model, node_id))
        self._put_placement(model, node_id)

    def unplace_model(self, model: str, node_id: str) -> None:
        with self._own_lock:
            self._own_placements.discard((model, node_id))
        self._delete_placement(model, node_id)

    @abstractmethod
    def placements(self, model: str) -> list[str]:
        """Ids of the nodes holding `model`, sorted."""

    def pick_node(
        self,
        model: str,
        alive_within_s: float = DEFAULT_ALIVE_WITHIN_S,
        extra_load: Mapping[str, float] | None = None,
    ) -> str | None:
        """The least-loaded live node holding `model`, else the least-loaded live node able to load it.

        A node is live while one of its instances is; its load is its instances' mean `busy`, plus
        `extra_load[node]`: what the caller knows the last heartbeats do not show yet (an api server's
        own requests in flight), so a burst between two heartbeats is spread rather than piled on one.
        """
        per_node: dict[str, list[float]] = {}
        for status in self.instances(alive_within_s):
            per_node.setdefault(status.info.node_id, []).append(status.busy)
        extra = extra_load or {}
        load = {node: sum(busy) / len(busy) + extra.get(node, 0.0) for node, busy in per_node.items()}
        holding = [node for node in self.placements(model) if node in load]
        able = [n.node_id for n in self.nodes() if model in n.models and n.node_id in load]
        candidates = holding or able
        return min(candidates, key=lambda node: (load[node], node)) if candidates else None

    # requests
    @abstractmethod
    def put_request(self, record: RequestRecord) -> None:
        """Add or replace a request's record (a terminal state starts its expiry)."""

    @abstractmethod
    def update_request(self, request_id: str, **request_fields: Any) -> bool:
        """Set some fields of a record at once, leaving the others as they are; False if it is gone.

        Setting a terminal `state` starts the record's expiry (`finished_ttl_s`).
        """

    @abstractmethod
    def append_output(
        self, request_id: str, token_ids: Iterable[int], first_token_s: float | None = None
    ) -> bool:
        """Append generated tokens and count them; `first_token_s` is kept only if none is set yet."""

    @abstractmethod
    def get_request(self, request_id: str) -> RequestRecord | None: ...

    @abstractmethod
    def requests(
        self, state: RequestState | str | None = None, model: str | None = None
    ) -> list[RequestRecord]:
        """Records (not yet expired) by arrival, optionally only of one state and/or model."""

    @abstractmethod
    def delete_request(self, request_id: str) -> None: ...

    # lifecycle
    def reregister(self) -> None:
        """Write again every node, placement and instance this client registered (after a store loss)."""
        self._replay(instance_ids=None)

    def _replay(self, instance_ids: list[str] | None) -> None:
        """Write again this client's nodes, placements and instances (all, or those named)."""
        with self._own_lock:
            nodes = list(self._own_nodes.values())
            placements = sorted(self._own_placements)
            instances = [
                copy.deepcopy(info)
                for instance_id, info in self._own_instances.items()
                if instance_ids is None or instance_id in instance_ids
            ]
        for node in nodes:
            self._put_node(node)
        for model, node_id in placements:
            self._put_placement(model, node_id)
        for info in instances:
            self._put_instance(info)

    def close(self) -> None:  # noqa: B027 (optional hook: a memory store holds no connections)
        """Release connections (the data stays)."""

    def __enter__(self) -> MetadataStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # what each implementation writes
    @abstractmethod
    def _put_instance(self, info: InstanceInfo) -> None: ...

    @abstractmethod
    def _beat(self, instance_id: str, load: dict[str, float] | None, resident: list[str] | None) -> bool:
        """Record a heartbeat; False if the instance is unknown."""

    @abstractmethod
    def _delete_instance(self, instance_id: str) -> None: ...

    @abstractmethod
    def _put_node(self, info: NodeInfo) -> None: ...

    @abstractmethod
    def _delete_node(self, node_id: str) -> None: ...

    @abstractmethod
    def _put_placement(self, model: str, node_id: str) -> None: ...

    @abstractmethod
    def _delete_placement(self, model: str, node_id: str) -> None: ...


# ---- in process ------------------------------------------------------------------------------------------


class MemoryStore(MetadataStore):
    """The store in this process's memory: one lock over plain dicts; expiry is checked lazily."""

    def __init__(
        self,
        finished_ttl_s: float = DEFAULT_FINISHED_TTL_S,
        instance_ttl_s: float = DEFAULT_INSTANCE_TTL_S,
    ) -> None:
        super().__init__(finished_ttl_s, instance_ttl_s)
        self._lock = threading.Lock()
        self._instances: dict[str, InstanceStatus] = {}
        self._nodes: dict[str, NodeInfo] = {}
        self._placements: dict[str, set[str]] = {}
        self._requests: dict[str, RequestRecord] = {}
        self._expires_at: dict[str, float] = {}  # request id -> time.monotonic() deadline

    # instances
    def _put_instance(self, info: InstanceInfo) -> None:
        with self._lock:
            self._instances[info.instance_id] = InstanceStatus(copy.deepcopy(info), time.time())

    def _beat(self, instance_id: str, load: dict[str, float] | None, resident: list[str] | None) -> bool:
        with self._lock:
            self._drop_silent_instances()
            status = self._instances.get(instance_id)
            if status is None:
                return False
            status.last_seen = time.time()
            if load is not None:
                status.load = dict(load)
            if resident is not None:
                status.info.models_resident = list(resident)
            return True

    def instances(self, alive_within_s: float | None = None) -> list[InstanceStatus]:
        with self._lock:
            self._drop_silent_instances()
            since = -float("inf") if alive_within_s is None else time.time() - alive_within_s
            alive = [s for s in self._instances.values() if s.last_seen >= since]
            return [copy.deepcopy(s) for s in sorted(alive, key=lambda s: s.info.instance_id)]

    def _delete_instance(self, instance_id: str) -> None:
        with self._lock:
            self._instances.pop(instance_id, None)

    def _drop_silent_instances(self) -> None:
        """Forget instances silent for `instance_ttl_s` (the Redis store's key expiry); under the lock."""
        cutoff = time.time() - self.instance_ttl_s
        for instance_id in [i for i, s in self._instances.items() if s.last_seen < cutoff]:
            del self._instances[instance_id]

    # nodes and placement
    def _put_node(self, info: NodeInfo) -> None:
        with self._lock:
            self._nodes[info.node_id] = copy.deepcopy(info)

    def nodes(self) -> list[NodeInfo]:
        with self._lock:
            return [copy.deepcopy(self._nodes[node_id]) for node_id in sorted(self._nodes)]

    def _delete_node(self, node_id: str) -> None:
        with self._lock:
            self._nodes.pop(node_id, None)
            for holders in self._placements.values():
                holders.discard(node_id)

    def _put_placement(self, model: str, node_id: str) -> None:
        with self._lock:
            self._placements.setdefault(model, set()).add(node_id)

    def _delete_placement(self, model: str, node_id: str) -> None:
        with self._lock:
            self._placements.get(model, set()).discard(node_id)

    def placements(self, model: str) -> list[str]:
        with self._lock:
            return sorted(self._placements.get(model, ()))

    # requests
    def put_request(self, record: RequestRecord) -> None:
        record = _from_hash(RequestRecord, _to_hash(record))  # a private copy, typed as Redis gives it back
        with self._lock:
            self._requests[record.request_id] = record
            self._set_expiry(record)

    def update_request(self, request_id: str, **request_fields: Any) -> bool:
        _check_update(request_fields)
        values = {name: _coerce(RequestRecord, name, value) for name, value in request_fields.items()}
        with self._lock:
            record = self._live_request(request_id)
            if record is None:
                return False
            for name, value in values.items():
                setattr(record, name, value)
            if "state" in values:
                self._set_expiry(record)
            return True

    def append_output(
        self, request_id: str, token_ids: Iterable[int], first_token_s: float | None = None
    ) -> bool:
        token_ids = [int(t) for t in token_ids]
        with self._lock:
            record = self._live_request(request_id)
            if record is None:
                return False
            record.output_token_ids.extend(token_ids)
            record.output_tokens += len(token_ids)
            if first_token_s is not None and record.first_token_s is None:
                record.first_token_s = float(first_token_s)
            return True

    def get_request(self, request_id: str) -> RequestRecord | None:
        with self._lock:
            record = self._live_request(request_id)
            return copy.deepcopy(record)

    def requests(
        self, state: RequestState | str | None = None, model: str | None = None
    ) -> list[RequestRecord]:
        state = None if state is None else RequestState(state)
        with self._lock:
            for request_id in list(self._expires_at):
                self._live_request(request_id)
            chosen = [
                r
                for r in self._requests.values()
                if (state is None or r.state is state) and (model is None or r.model == model)
            ]
            return [copy.deepcopy(r) for r in sorted(chosen, key=lambda r: (r.arrival_s, r.request_id))]

    def delete_request(self, request_id: str) -> None:
        with self._lock:
            self._requests.pop(request_id, None)
            self._expires_at.pop(request_id, None)

    def _live_request(self, request_id: str) -> RequestRecord | None:
        """The record, dropping it if expired; under the lock."""
        deadline = self._expires_at.get(request_id)
        if deadline is not None and time.monotonic() >= deadline:
            del self._expires_at[request_id]
            self._requests.pop(request_id, None)
        return self._requests.get(request_id)

    def _set_expiry(self, record: RequestRecord) -> None:
        if record.state.terminal:
            self._expires_at[record.request_id] = time.monotonic() + self.finished_ttl_s
        else:
            self._expires_at.pop(record.request_id, None)


# ---- Redis -----------------------------------------------------------------------------------------------

# Liveness uses the Redis server's clock (TIME), so machines whose clocks disagree still agree on who is
# alive. Scripts run atomically; Redis 7 replicates their effects, so TIME inside a writing script is fine.
_NOW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

# KEYS: instance hash, instances zset. ARGV: instance id, ttl ms, then field, value pairs.
_REGISTER_INSTANCE_LUA = (
    _NOW_LUA
    + """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'last_seen', string.format('%.6f', now), 'load', '{}', unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], now, ARGV[1])
return 1
"""
)

# KEYS: instance hash, instances zset. ARGV: instance id, ttl ms, load JSON or '', models JSON or ''.
_HEARTBEAT_LUA = (
    _NOW_LUA
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[2]) / 1000)
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 0
end
redis.call('HSET', KEYS[1], 'last_seen', string.format('%.6f', now))
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'load', ARGV[3]) end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'models_resident', ARGV[4]) end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], now, ARGV[1])
return 1
"""
)

# The requests index is a zset scored by when the record expires (+inf while in flight), so expired ids
# leave it in one ZREMRANGEBYSCORE alongside their hashes' own expiry.
# KEYS: request hash, requests zset. ARGV: request id, ttl ms or '', then field, value pairs.
_PUT_REQUEST_LUA = (
    _NOW_LUA
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
if ARGV[2] == '' then
  redis.call('ZADD', KEYS[2], '+inf', ARGV[1])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]) / 1000, ARGV[1])
end
return 1
"""
)

# KEYS: request hash, requests zset. ARGV: request id, expiry ('' keep, 'persist', or ttl ms), number of
# field, value pairs n, the pairs, then the fields to delete.
_UPDATE_REQUEST_LUA = (
    _NOW_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local n = tonumber(ARGV[3])
if n > 0 then redis.call('HSET', KEYS[1], unpack(ARGV, 4, 3 + 2 * n)) end
if #ARGV > 3 + 2 * n then redis.call('HDEL', KEYS[1], unpack(ARGV, 4 + 2 * n)) end
if ARGV[2] == 'persist' then
  redis.call('PERSIST', KEYS[1])
  redis.call('ZADD', KEYS[2], '+inf', ARGV[1])
elseif ARGV[2] ~= '' then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]) / 1000, ARGV[1])
end
return 1
"""
)

# KEYS: request hash. ARGV: token ids as "1,2,3", their count, first_token_s or ''.
_APPEND_OUTPUT_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local ids = redis.call('HGET', KEYS[1], 'output_token_ids')
if not ids or ids == '[]' then
  ids = '[' .. ARGV[1] .. ']'
else
  ids = string.sub(ids, 1, -2) .. ',' .. ARGV[1] .. ']'
end
redis.call('HSET', KEYS[1], 'output_token_ids', ids)
redis.call('HINCRBY', KEYS[1], 'output_tokens', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSETNX', KEYS[1], 'first_token_s', ARGV[3]) end
return 1
"""


class _Retry(Retry):
    """redis-py's retry, except that a rejected password fails at once (it is a ConnectionError too)."""

    def call_with_retry(self, do: Any, *args: Any, **kwargs: Any) -> Any:
        def attempt() -> Any:
            try:
                return do()
            except redis.AuthenticationError as error:
                raise _NoRetry(error) from error

        try:
            return super().call_with_retry(attempt, *args, **kwargs)
        except _NoRetry as stop:
            raise stop.error from None


class _NoRetry(Exception):
    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _store_errors(method: Callable[..., T]) -> Callable[..., T]:
    """Turn redis-py's connection errors (left after the retries) into store errors that say what to fix."""

    @functools.wraps(method)
    def call(self: RedisStore, *args: Any, **kwargs: Any) -> T:
        try:
            return method(self, *args, **kwargs)
        except redis.AuthenticationError as error:
            raise StoreAuthenticationError(
                f"Redis at {self.where} refused the credentials in the URL ({error}); "
                "check the password in redis://:PASSWORD@host:port/db"
            ) from error
        except (redis.ConnectionError, redis.TimeoutError) as error:
            raise StoreUnavailableError(f"cannot reach Redis at {self.where}: {error}") from error

    return call


class RedisStore(MetadataStore):
    """The store in Redis, under `key_prefix`, shared by every api server and node that opens the same URL.

    `url` is anything redis-py's `Redis.from_url` takes: `redis://[[user]:password@]host[:port][/db]`,
    `rediss://` (TLS), `unix://path`. Connection errors are retried with a bounded backoff, so a Redis
    restart is ridden out; Redis without persistence loses its data then, and `heartbeat` (or
    `reregister`) writes back what this client registered.
    """

    def __init__(
        self,
        url: str,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        finished_ttl_s: float = DEFAULT_FINISHED_TTL_S,
        instance_ttl_s: float = DEFAULT_INSTANCE_TTL_S,
        retries: int = RETRIES,
        **redis_kwargs: Any,
    ) -> None:
        super().__init__(finished_ttl_s, instance_ttl_s)
        self.key_prefix = key_prefix
        options: dict[str, Any] = dict(
            decode_responses=True,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            retry=_Retry(ExponentialBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S), retries),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
            health_check_interval=HEALTH_CHECK_INTERVAL_S,
        )
        options.update(redis_kwargs)
        self._redis = redis.Redis.from_url(url, **options)
        self.where = self._describe()
        self._register_instance = self._redis.register_script(_REGISTER_INSTANCE_LUA)
        self._heartbeat = self._redis.register_script(_HEARTBEAT_LUA)
        self._put_request = self._redis.register_script(_PUT_REQUEST_LUA)
        self._update_request = self._redis.register_script(_UPDATE_REQUEST_LUA)
        self._append_output = self._redis.register_script(_APPEND_OUTPUT_LUA)
        self.ping()  # fail here, clearly, rather than on the first request

    @_store_errors
    def ping(self) -> None:
        """Check that Redis answers and takes our credentials."""
        self._redis.ping()

    def close(self) -> None:
        self._redis.close()

    def _describe(self) -> str:
        """host:port/db (or the socket path) for messages, never the password."""
        kwargs = self._redis.connection_pool.connection_kwargs
        scheme = "rediss" if self._redis.connection_pool.connection_class is redis.SSLConnection else "redis"
        if "path" in kwargs:
            return f"unix://{kwargs['path']}"
        return f"{scheme}://{kwargs.get('host')}:{kwargs.get('port')}/{kwargs.get('db', 0)}"

    def _key(self, *parts: str) -> str:
        return ":".join((self.key_prefix, *parts))

    # instances
    @_store_errors
    def _put_instance(self, info: InstanceInfo) -> None:
        pairs = [item for pair in _to_hash(info).items() for item in pair]
        self._register_instance(
            keys=[self._key("instance", info.instance_id), self._key("instances")],
            args=[info.instance_id, _ms(self.instance_ttl_s), *pairs],
        )

    @_store_errors
    def _beat(self, instance_id: str, load: dict[str, float] | None, resident: list[str] | None) -> bool:
        found = self._heartbeat(
            keys=[self._key("instance", instance_id), self._key("instances")],
            args=[
                instance_id,
                _ms(self.instance_ttl_s),
                "" if load is None else _encode(load),
                "" if resident is None else _encode(resident),
            ],
        )
        return bool(found)

    @_store_errors
    def instances(self, alive_within_s: float | None = None) -> list[InstanceStatus]:
        if alive_within_s is None:
            ids = self._redis.zrange(self._key("instances"), 0, -1)
        else:
            seconds, micros = self._redis.time()
            since = seconds + micros / 1e6 - alive_within_s
            ids = self._redis.zrangebyscore(self._key("instances"), since, "+inf")
        statuses = []
        for mapping in self._hgetall_many("instance", ids):
            if mapping:  # else it expired after the zset was read
                statuses.append(
                    InstanceStatus(
                        _from_hash(InstanceInfo, mapping),
                        float(mapping["last_seen"]),
                        {k: float(v) for k, v in json.loads(mapping.get("load", "{}")).items()},
                    )
                )
        return sorted(statuses, key=lambda s: s.info.instance_id)

    @_store_errors
    def _delete_instance(self, instance_id: str) -> None:
        with self._redis.pipeline() as pipe:
            pipe.delete(self._key("instance", instance_id))
            pipe.zrem(self._key("instances"), instance_id)
            pipe.execute()

    def _hgetall_many(self, kind: str, ids: list[str]) -> list[dict[str, str]]:
        if not ids:
            return []
        with self._redis.pipeline(transaction=False) as pipe:
            for item_id in ids:
                pipe.hgetall(self._key(kind, item_id))
            return pipe.execute()

    # nodes and placement
    @_store_errors
    def _put_node(self, info: NodeInfo) -> None:
        key = self._key("node", info.node_id)
        with self._redis.pipeline() as pipe:  # MULTI: readers never see half a node
            pipe.delete(key)
            pipe.hset(key, mapping=_to_hash(info))
            pipe.sadd(self._key("nodes"), info.node_id)
            pipe.execute()

    @_store_errors
    def nodes(self) -> list[NodeInfo]:
        ids = sorted(self._redis.smembers(self._key("nodes")))
        return [_from_hash(NodeInfo, m) for m in self._hgetall_many("node", ids) if m]

    @_store_errors
    def _delete_node(self, node_id: str) -> None:
        models = self._redis.smembers(self._key("models"))
        with self._redis.pipeline() as pipe:
            pipe.delete(self._key("node", node_id))
            pipe.srem(self._key("nodes"), node_id)
            for model in models:
                pipe.srem(self._key("placement", model), node_id)
            pipe.execute()

    @_store_errors
    def _put_placement(self, model: str, node_id: str) -> None:
        with self._redis.pipeline() as pipe:
            pipe.sadd(self._key("placement", model), node_id)
            pipe.sadd(self._key("models"), model)
            pipe.execute()

    @_store_errors
    def _delete_placement(self, model: str, node_id: str) -> None:
        self._redis.srem(self._key("placement", model), node_id)

    @_store_errors
    def placements(self, model: str) -> list[str]:
        return sorted(self._redis.smembers(self._key("placement", model)))

    # requests
    @_store_errors
    def put_request(self, record: RequestRecord) -> None:
        state = RequestState(record.state)
        pairs = [item for pair in _to_hash(record).items() for item in pair]
        self._put_request(
            keys=[self._key("request", record.request_id), self._key("requests")],
            args=[record.request_id, _ms(self.finished_ttl_s) if state.terminal else "", *pairs],
        )

    @_store_errors
    def update_request(self, request_id: str, **request_fields: Any) -> bool:
        _check_update(request_fields)
        to_set = {name: _encode(v) for name, v in request_fields.items() if v is not None}
        to_delete = [name for name, v in request_fields.items() if v is None]
        expiry = ""
        if "state" in request_fields:
            state = RequestState(request_fields["state"])
            to_set["state"] = state.value
            expiry = _ms(self.finished_ttl_s) if state.terminal else "persist"
        pairs = [item for pair in to_set.items() for item in pair]
        found = self._update_request(
            keys=[self._key("request", request_id), self._key("requests")],
            args=[request_id, expiry, len(to_set), *pairs, *to_delete],
        )
        return bool(found)

    @_store_errors
    def append_output(
        self, request_id: str, token_ids: Iterable[int], first_token_s: float | None = None
    ) -> bool:
        token_ids = [int(t) for t in token_ids]
        if not token_ids and first_token_s is None:
            return self._redis.exists(self._key("request", request_id)) > 0
        found = self._append_output(
            keys=[self._key("request", request_id)],
            args=[
                ",".join(map(str, token_ids)),
                len(token_ids),
                "" if first_token_s is None else _encode(float(first_token_s)),
            ],
        )
        return bool(found)

    @_store_errors
    def get_request(self, request_id: str) -> RequestRecord | None:
        mapping = self._redis.hgetall(self._key("request", request_id))
        return _from_hash(RequestRecord, mapping) if mapping else None

    @_store_errors
    def requests(
        self, state: RequestState | str | None = None, model: str | None = None
    ) -> list[RequestRecord]:
        state = None if state is None else RequestState(state)
        seconds, micros = self._redis.time()
        index = self._key("requests")
        self._redis.zremrangebyscore(index, "-inf", seconds + micros / 1e6)
        ids = self._redis.zrange(index, 0, -1)
        records = [_from_hash(RequestRecord, m) for m in self._hgetall_many("request", ids) if m]
        chosen = [
            r for r in records if (state is None or r.state is state) and (model is None or r.model == model)
        ]
        return sorted(chosen, key=lambda r: (r.arrival_s, r.request_id))

    @_store_errors
    def delete_request(self, request_id: str) -> None:
        with self._redis.pipeline() as pipe:
            pipe.delete(self._key("request", request_id))
            pipe.zrem(self._key("requests"), request_id)
            pipe.execute()


def _ms(seconds: float) -> str:
    """A TTL in whole milliseconds, at least one (PEXPIRE 0 would delete the key at once)."""
    return str(max(1, round(seconds * 1000)))


MEMORY_URLS = ("", "memory", "memory://")
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def open_store(
    url: str | None = None,
    *,
    key_prefix: str = DEFAULT_KEY_PREFIX,
    finished_ttl_s: float = DEFAULT_FINISHED_TTL_S,
    instance_ttl_s: float = DEFAULT_INSTANCE_TTL_S,
) -> MetadataStore:
    """MemoryStore for None (or "memory://"), RedisStore for a redis://, rediss:// or unix:// URL.

    `key_prefix` matters only to Redis; it is accepted either way so that callers pass one set of settings.
    """
    if url is None or url in MEMORY_URLS:
        return MemoryStore(finished_ttl_s=finished_ttl_s, instance_ttl_s=instance_ttl_s)
    if url.startswith(REDIS_SCHEMES):
        return RedisStore(
            url, key_prefix=key_prefix, finished_ttl_s=finished_ttl_s, instance_ttl_s=instance_ttl_s
        )
    raise ValueError(f"metadata store URL must start with one of {REDIS_SCHEMES} (or be None): {url!r}")
