"""The store in Redis, shared by every api server and node that opens the same URL."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from aegaeon.config import DEFAULT_FINISHED_TTL_S
from aegaeon.serve.metadata import redis_scripts
from aegaeon.serve.metadata.codec import check_update, encode_value, from_hash, to_hash
from aegaeon.serve.metadata.records import (
    DEFAULT_INSTANCE_TTL_S,
    InstanceInfo,
    InstanceStatus,
    ModelRecord,
    NodeInfo,
    RequestRecord,
    RequestState,
    StoreAuthenticationError,
    StoreUnavailableError,
)
from aegaeon.serve.metadata.store import MetadataStore

DEFAULT_KEY_PREFIX = "aegaeon"

# Redis client: a command that meets a connection error reconnects and retries with exponential backoff,
# RETRIES times (about 5 s in all), long enough to ride out a Redis restart, short enough to fail clearly.
SOCKET_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 2.0
RETRIES = 8
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 1.0
# A connection idle this long is PINGed before use, so a dead one is replaced before a command is lost on it.
HEALTH_CHECK_INTERVAL_S = 30

T = TypeVar("T")


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
        self._register_instance = self._redis.register_script(redis_scripts.REGISTER_INSTANCE_LUA)
        self._heartbeat = self._redis.register_script(redis_scripts.HEARTBEAT_LUA)
        self._put_request = self._redis.register_script(redis_scripts.PUT_REQUEST_LUA)
        self._update_request = self._redis.register_script(redis_scripts.UPDATE_REQUEST_LUA)
        self._append_output = self._redis.register_script(redis_scripts.APPEND_OUTPUT_LUA)
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
        pairs = [item for pair in to_hash(info).items() for item in pair]
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
                "" if load is None else encode_value(load),
                "" if resident is None else encode_value(resident),
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
                        from_hash(InstanceInfo, mapping),
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
        self._replace_listed(self._key("node", info.node_id), info, self._key("nodes"), info.node_id)

    def _replace_listed(self, key: str, record: Any, index: str, member: str) -> None:
        """Write `record` as the hash at `key` (replacing it whole) and list `member` in the set `index`."""
        with self._redis.pipeline() as pipe:  # MULTI: readers never see half a record
            pipe.delete(key)
            pipe.hset(key, mapping=to_hash(record))
            pipe.sadd(index, member)
            pipe.execute()

    @_store_errors
    def nodes(self) -> list[NodeInfo]:
        ids = sorted(self._redis.smembers(self._key("nodes")))
        return [from_hash(NodeInfo, m) for m in self._hgetall_many("node", ids) if m]

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

    # the model registry
    @_store_errors
    def put_model(self, record: ModelRecord) -> None:
        self._replace_listed(self._key("registry", record.name), record, self._key("registry"), record.name)

    @_store_errors
    def add_model_if_absent(self, record: ModelRecord) -> bool:
        # The set decides who registers a name; a reader that meets the name before its hash skips it.
        if not self._redis.sadd(self._key("registry"), record.name):
            return False
        self._redis.hset(self._key("registry", record.name), mapping=to_hash(record))
        return True

    @_store_errors
    def registered_models(self) -> list[ModelRecord]:
        names = sorted(self._redis.smembers(self._key("registry")))
        return [from_hash(ModelRecord, m) for m in self._hgetall_many("registry", names) if m]

    @_store_errors
    def remove_model(self, name: str) -> None:
        with self._redis.pipeline() as pipe:
            pipe.srem(self._key("registry"), name)
            pipe.delete(self._key("registry", name))
            pipe.execute()

    # requests
    @_store_errors
    def put_request(self, record: RequestRecord) -> None:
        state = RequestState(record.state)
        pairs = [item for pair in to_hash(record).items() for item in pair]
        self._put_request(
            keys=[self._key("request", record.request_id), self._key("requests")],
            args=[record.request_id, _ms(self.finished_ttl_s) if state.terminal else "", *pairs],
        )

    @_store_errors
    def update_request(self, request_id: str, **request_fields: Any) -> bool:
        check_update(request_fields)
        to_set = {name: encode_value(v) for name, v in request_fields.items() if v is not None}
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
                "" if first_token_s is None else encode_value(float(first_token_s)),
            ],
        )
        return bool(found)

    @_store_errors
    def get_request(self, request_id: str) -> RequestRecord | None:
        mapping = self._redis.hgetall(self._key("request", request_id))
        return from_hash(RequestRecord, mapping) if mapping else None

    @_store_errors
    def requests(
        self, state: RequestState | str | None = None, model: str | None = None
    ) -> list[RequestRecord]:
        state = None if state is None else RequestState(state)
        seconds, micros = self._redis.time()
        index = self._key("requests")
        self._redis.zremrangebyscore(index, "-inf", seconds + micros / 1e6)
        ids = self._redis.zrange(index, 0, -1)
        records = [from_hash(RequestRecord, m) for m in self._hgetall_many("request", ids) if m]
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
