"""What the metadata store holds: instances, nodes and request records, and the store's errors."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field, fields

from aegaeon.config import DEFAULT_PRIORITY

# An instance silent this long is dropped from the registry (liveness itself is `alive_within_s`).
DEFAULT_INSTANCE_TTL_S = 300.0
# The liveness window `pick_node` uses: a few missed heartbeats of a node beating every second or two.
DEFAULT_ALIVE_WITHIN_S = 10.0

# Keys of the load summary a heartbeat carries.
LOAD_WAITING = "waiting"  # requests queued on the instance
LOAD_RUNNING = "running"  # requests in its running batches
LOAD_KV_USAGE = "kv_usage"  # fraction of its KV blocks in use, 0..1


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
    # Per model: "host" (in its host model cache), "loading" (being registered) or "disk".
    model_states: dict[str, str] = field(default_factory=dict)
    devices: int = 1  # instances it runs
    host_cache_bytes: int = 0  # capacity of its host model cache
    registered_at: float = field(default_factory=time.time)


# A registered model's life in the registry: served, or being drained before its removal.
MODEL_ACTIVE = "active"
MODEL_DRAINING = "draining"
# Where a registered model came from: a node's configuration (YAML, command line: that node serves it,
# and it is listed while a live node does) or the admin API (every node serves it).
FROM_CONFIG = "config"
FROM_ADMIN = "admin"


@dataclass
class ModelRecord:
    """A model of the live registry: where its weights are and how it is served.

    `ttft_s` / `tbt_s` (None: the node's default SLO) and `priority` (a weight: its share of decode
    rounds and its place in prefill order) steer scheduling; `pinned` keeps it in every node's host
    model cache.
    """

    name: str
    path: str
    ttft_s: float | None = None
    tbt_s: float | None = None
    priority: float = DEFAULT_PRIORITY
    pinned: bool = False
    state: str = MODEL_ACTIVE  # MODEL_ACTIVE | MODEL_DRAINING
    source: str = FROM_ADMIN  # FROM_ADMIN | FROM_CONFIG
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
