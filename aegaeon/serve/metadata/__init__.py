"""The metadata store: instances and their heartbeats, nodes and model placement, and every request's record.

One interface, `MetadataStore`, two implementations: `MemoryStore` (in process, the default) and
`RedisStore` (shared by several api servers and nodes, so a request outlives the process that accepted
it). `open_store(url)` picks one. The Redis key schema and the liveness rule are in docs/metadata.md.

Torch-free and engine-free: api servers import this without loading a model.
"""

from __future__ import annotations

from aegaeon.config import DEFAULT_FINISHED_TTL_S
from aegaeon.serve.metadata.memory import MemoryStore
from aegaeon.serve.metadata.records import (
    DEFAULT_ALIVE_WITHIN_S,
    DEFAULT_INSTANCE_TTL_S,
    FROM_ADMIN,
    FROM_CONFIG,
    LOAD_KV_USAGE,
    LOAD_RUNNING,
    LOAD_WAITING,
    MODEL_ACTIVE,
    MODEL_DRAINING,
    TERMINAL_STATES,
    UPDATABLE_REQUEST_FIELDS,
    InstanceInfo,
    InstanceStatus,
    MetadataStoreError,
    ModelRecord,
    NodeInfo,
    RequestRecord,
    RequestState,
    StoreAuthenticationError,
    StoreUnavailableError,
)
from aegaeon.serve.metadata.redis_store import DEFAULT_KEY_PREFIX, RedisStore
from aegaeon.serve.metadata.store import MetadataStore

__all__ = [
    "DEFAULT_ALIVE_WITHIN_S",
    "DEFAULT_FINISHED_TTL_S",
    "DEFAULT_INSTANCE_TTL_S",
    "DEFAULT_KEY_PREFIX",
    "FROM_ADMIN",
    "FROM_CONFIG",
    "LOAD_KV_USAGE",
    "LOAD_RUNNING",
    "LOAD_WAITING",
    "TERMINAL_STATES",
    "UPDATABLE_REQUEST_FIELDS",
    "InstanceInfo",
    "InstanceStatus",
    "MemoryStore",
    "MetadataStore",
    "MODEL_ACTIVE",
    "MODEL_DRAINING",
    "MetadataStoreError",
    "ModelRecord",
    "NodeInfo",
    "RedisStore",
    "RequestRecord",
    "RequestState",
    "StoreAuthenticationError",
    "StoreUnavailableError",
    "open_store",
]

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
