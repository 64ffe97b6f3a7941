"""aegaeon's configuration, in one typed place."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from aegaeon.instance.devices import device_type, parse_devices

MIB = 1 << 20

DEFAULT_MAX_NUM_SEQS = 64
DEFAULT_MAX_NUM_BATCHED_TOKENS = 4096
# Bytes of KV blocks of a CPU engine whose arena size is not given (elsewhere the KV region is what
# the arena leaves beside its resident models, aegaeon/memory/sizing.py).
DEFAULT_KV_CACHE_BYTES = 512 * MIB
# Where the CPU attention kernel is compiled to on first use (one file per source, flags and CPU).
KERNEL_CACHE_DIR = "~/.cache/aegaeon/kernels"


@dataclass(frozen=True)
class EngineConfig:
    """How one engine batches and how much KV memory it holds."""

    # Sequences decoded together in one step, at most.
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    # Prompt tokens prefilled together in one step, at most (a longer prompt runs alone).
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    # Bytes of KV blocks; the block count follows from the model's block size. None: on CUDA (or with
    # cpu_arena_bytes) what the arena leaves after room for the largest model twice, else
    # DEFAULT_KV_CACHE_BYTES.
    kv_cache_bytes: int | None = None
    # Longest sequence (prompt + output); None: the model's max_position_embeddings.
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "kv_cache_bytes"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")


# --- tensor parallelism ------------------------------------------------------------------------

# How long a rank of a tensor-parallel engine waits in a collective (or for its peers to start)
# before failing. A rank that dies is noticed at once (its sockets close); this bounds a hung one.
TENSOR_PARALLEL_TIMEOUT_S = 300.0
# How often a rank process checks that its rank 0 is alive (it exits when rank 0 is gone).
RANK_PARENT_CHECK_S = 0.5


# --- memory (device arena, host model cache, host KV pool) ---------------------------------------

# Tokens per KV block: a block holds K and V of all layers for this many tokens, contiguous (the
# engine's cache, the host KV pool and the scheduler's KV sums all count in these blocks).
BLOCK_SIZE = 16

GIB = 1 << 30
# Every tensor in the arena and the host caches starts on this boundary (vector loads, DMA).
MEMORY_ALIGNMENT = 16
# The arena holds all of an engine's weights and KV; the rest of the device's free memory is left to
# activations and kernel workspaces (a few GiB of an 80 GB device).
DEFAULT_DEVICE_MEMORY_FRACTION = 0.95
DEFAULT_KV_SLAB_BYTES = 1 * GIB
# Host-to-device copies go in chunks this large, so one chunk's copy overlaps the next one's issue.
DEFAULT_LOAD_CHUNK_BYTES = 64 * MIB
DEFAULT_SHM_DIR = "/dev/shm"
# Where a served model's weights are, best first (`/v1/models` reports it): in an instance's device
# arena, in a node's host model cache, being read into one, or only on disk.
MODEL_ON_DEVICE, MODEL_IN_HOST, MODEL_LOADING, MODEL_ON_DISK = "device", "host", "loading", "disk"

# --- memory tiers: disk -> host model cache -> device arena (aegaeon/memory/sizing.py) -----------

# The device arena keeps room for this many copies of the largest model: the active one and a
# prefetched next one; the KV region gets the rest unless kv_cache_bytes is set.
RESIDENT_MODELS_ON_DEVICE = 2
# The node's two shared host pools together take this fraction of the host memory available when it
# starts (the smaller of MemAvailable and the free space of shm_dir) ...
DEFAULT_HOST_MEMORY_FRACTION = 0.8
# ... of which the host KV pool gets this share when host_kv_pool_bytes is not set; the host model
# cache gets the rest.
DEFAULT_HOST_KV_POOL_FRACTION = 0.25
# Safetensors are read into the host model cache by this many threads, in reads of at most this many
# bytes, so a fast disk has several requests in flight.
DEFAULT_DISK_READ_THREADS = 8
DEFAULT_DISK_READ_CHUNK_BYTES = 16 * MIB
# A switch to a model the host model cache has no room for (every model in it is active or being
# prefetched somewhere) waits this long for one to be released before failing.
DEFAULT_HOST_CACHE_WAIT_S = 60.0


@dataclass(frozen=True)
class MemoryConfig:
    """Sizes of the device arena and of the node's shared host pools."""

    # CUDA: the arena is this fraction of the device's free memory at start.
    device_memory_fraction: float = DEFAULT_DEVICE_MEMORY_FRACTION
    # CPU: the arena's size in bytes (there is no "device memory" to take a fraction of); None:
    # the KV bytes plus room for two copies of the largest model (the active one and a prefetch).
    cpu_arena_bytes: int | None = None
    host_kv_pool_bytes: int | None = None
    kv_slab_bytes: int = DEFAULT_KV_SLAB_BYTES
    load_chunk_bytes: int = DEFAULT_LOAD_CHUNK_BYTES
    # Where the shared-memory files of a node live (tmpfs).
    shm_dir: str = DEFAULT_SHM_DIR
    # --- tiers (docs/memory.md) ---
    # The node's host model cache; None: host_memory_fraction of the available host memory minus the
    # host KV pool (an engine on its own: at most what its models need).
    host_model_cache_bytes: int | None = None
    host_memory_fraction: float = DEFAULT_HOST_MEMORY_FRACTION
    # The host KV pool's share of that when host_kv_pool_bytes (above) is None.
    host_kv_pool_fraction: float = DEFAULT_HOST_KV_POOL_FRACTION
    disk_read_threads: int = DEFAULT_DISK_READ_THREADS
    disk_read_chunk_bytes: int = DEFAULT_DISK_READ_CHUNK_BYTES
    host_cache_wait_s: float = DEFAULT_HOST_CACHE_WAIT_S
    # Set by the node, not a setting: instances sharing this GPU. Above 1, each one's arena is
    # device_memory_fraction / device_sharers of the GPU's total memory (at most the fraction of what
    # is free), so the split does not depend on the order they start in.
    device_sharers: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.device_memory_fraction <= 1:
            raise ValueError(f"device_memory_fraction must be in (0, 1], got {self.device_memory_fraction}")
        for name in (
            "cpu_arena_bytes",
            "host_model_cache_bytes",
            "host_kv_pool_bytes",
            "kv_slab_bytes",
            "load_chunk_bytes",
            "disk_read_threads",
            "disk_read_chunk_bytes",
            "device_sharers",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name in ("host_memory_fraction", "host_kv_pool_fraction"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if self.host_cache_wait_s < 0:
            raise ValueError(f"host_cache_wait_s must be >= 0, got {self.host_cache_wait_s}")


# --- scheduling (DESIGN.md, "Token-level scheduling") --------------------------------------------

DEFAULT_TTFT_SLO_S = 10.0
DEFAULT_TBT_SLO_S = 0.1
# Prefill: a group holds at most this many requests of one model.
DEFAULT_MAX_GROUP_SIZE = 8
# Decode: the longest turn any batch gets in a round, in seconds. DESIGN.md (the paper) says 4 s, but
# at H100 step times (8-12 ms) a 4 s turn is 300-500 tokens, longer than a whole typical request, and
# a round of several batches then outlasts the 10 s TTFT slack of a request waiting for its second
# turn. The simulator's paper-setup sweep (docs/simulation.md) sustained more models on 16 GPUs with
# 1 s than with 4 s.
DEFAULT_QMAX_S = 1.0
# Decode: alpha never drops below this (a round never aims at half the TBT SLO or less)...
DEFAULT_ALPHA_FLOOR = 0.5
# ... unless the floor would spend more than this share of a round on switches and KV swaps. Cheap
# switches (a resident model costs a few ms) would otherwise shrink turns to one or two steps, each
# paying a full KV swap in and out; the turns stay long enough that swaps are a small fraction of them.
DEFAULT_MAX_SWITCH_SHARE = 0.1
# Decode: the longest QMAX a round may choose when its switches are so slow that QMAX turns cannot keep
# alpha <= 1 (the TBT SLO); None keeps QMAX fixed. A round then takes the smallest QMAX in
# [qmax_s, qmax_max_s] that gets alpha to 1.
DEFAULT_QMAX_MAX_S = None
# Decode: a request joins a batch only if the batch's KV still fits with this many tokens to spare.
DEFAULT_KV_LOOKAHEAD_TOKENS = 64
# A request scores "within deadline" when its paper-style time-fraction score is at least this.
DEFAULT_ATTAINMENT_TARGET = 0.9
# Priorities and fairness (docs/scheduling.md): a model's priority weights its share of each decode
# round and moves its prefills ahead of lower-priority models' (never past their TTFT SLO); an API
# key's weight is its share of each model's waiting queue. Equal weights schedule as if there were none.
DEFAULT_PRIORITY = 1.0
DEFAULT_KEY_WEIGHT = 1.0


def check_weight(what: str, value: float) -> float:
    """`value` as a float if it is a usable weight (finite, > 0); else a ValueError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{what} must be a positive number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SLO:
    """Latency targets of one model: time to first token and time between tokens, in seconds."""

    ttft_s: float = DEFAULT_TTFT_SLO_S
    tbt_s: float = DEFAULT_TBT_SLO_S

    def __post_init__(self) -> None:
        if self.ttft_s <= 0 or self.tbt_s <= 0:
            raise ValueError(f"SLO targets must be positive, got ttft_s={self.ttft_s}, tbt_s={self.tbt_s}")


@dataclass(frozen=True)
class SchedulerConfig:
    """The knobs of grouped-FCFS prefill and weighted round-robin decode."""

    default_slo: SLO = SLO()
    # Per-model SLOs by model name; a model not listed gets `default_slo`.
    model_slos: tuple[tuple[str, SLO], ...] = ()
    max_group_size: int = DEFAULT_MAX_GROUP_SIZE
    qmax_s: float = DEFAULT_QMAX_S
    alpha_floor: float = DEFAULT_ALPHA_FLOOR
    max_switch_share: float = DEFAULT_MAX_SWITCH_SHARE
    qmax_max_s: float | None = DEFAULT_QMAX_MAX_S
    kv_lookahead_tokens: int = DEFAULT_KV_LOOKAHEAD_TOKENS
    # Per-model priorities (weights) by model name; a model not listed has DEFAULT_PRIORITY.
    model_priorities: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        for model, priority in self.model_priorities:
            check_weight(f"the priority of model {model!r}", priority)
        if self.max_group_size < 1:
            raise ValueError(f"max_group_size must be >= 1, got {self.max_group_size}")
        if self.qmax_s <= 0:
            raise ValueError(f"qmax_s must be positive, got {self.qmax_s}")
        if self.alpha_floor <= 0:
            raise ValueError(f"alpha_floor must be positive, got {self.alpha_floor}")
        if self.qmax_max_s is not None and self.qmax_max_s < self.qmax_s:
            raise ValueError(f"qmax_max_s must be >= qmax_s ({self.qmax_s}), got {self.qmax_max_s}")
        if not 0 < self.max_switch_share < 1:
            raise ValueError(f"max_switch_share must be in (0, 1), got {self.max_switch_share}")
        if self.kv_lookahead_tokens < 0:
            raise ValueError(f"kv_lookahead_tokens must be >= 0, got {self.kv_lookahead_tokens}")

    def slo(self, model: str) -> SLO:
        """The SLO of `model`."""
        return dict(self.model_slos).get(model, self.default_slo)

    def priority(self, model: str) -> float:
        """The priority (weight) of `model`."""
        return dict(self.model_priorities).get(model, DEFAULT_PRIORITY)


# --- latency profiles (aegaeon/instance/profiler.py, aegaeon/scheduler/predictor.py) -------------

# Points per axis of the profiling grid: prompt lengths up to max_model_len, decode batch sizes up to
# max_num_seqs and decode context lengths up to max_model_len, each spaced geometrically from the
# smallest below (most prompts are short, and a relative error weighs as much at 16 tokens as at 2k).
# A demo model on the CPU profiles in seconds at these densities; a 7B model on a GPU in about a minute.
DEFAULT_PROFILE_PREFILL_POINTS = 10
DEFAULT_PROFILE_BATCH_POINTS = 5
DEFAULT_PROFILE_CONTEXT_POINTS = 5
PROFILE_MIN_PROMPT_TOKENS = 4
PROFILE_MIN_CONTEXT_TOKENS = 16
# Each point is measured this many times (after one warm-up run); times farther than
# PROFILE_OUTLIER_MADS scaled median absolute deviations from their median are dropped (a step that
# another process preempted), and the mean of the rest is the point's time.
DEFAULT_PROFILE_REPEATS = 5
PROFILE_OUTLIER_MADS = 3.0
# The held-out error of a fit: each point is predicted by the fit of the others, in this many folds
# (point i is held out in fold i mod folds).
DEFAULT_PROFILE_FOLDS = 5
# A fit whose held-out mean relative error exceeds this is reported as poor (the node warns at start):
# the scheduler's quotas rest on step predictions, and its TBT slack is about this fine.
PROFILE_POOR_FIT_ERROR = 0.15
# Live calibration: a serving node scales each model's predictions by the running ratio of measured
# to predicted step times (a profile is measured in-process on an idle engine; live steps also pay
# the call into the instance process and share the machine). The ratio's logarithm is the mean of the
# first steps', then each step moves it this far toward its own; it stays within the bounds (beyond
# them the profile itself is wrong: re-profile).
CALIBRATION_WEIGHT = 0.05
CALIBRATION_BOUNDS = (0.25, 4.0)


@dataclass(frozen=True)
class ProfileGrid:
    """How densely, and how many times over, `aegaeon profile` measures a model."""

    prefill_points: int = DEFAULT_PROFILE_PREFILL_POINTS
    batch_points: int = DEFAULT_PROFILE_BATCH_POINTS
    context_points: int = DEFAULT_PROFILE_CONTEXT_POINTS
    repeats: int = DEFAULT_PROFILE_REPEATS
    folds: int = DEFAULT_PROFILE_FOLDS

    def __post_init__(self) -> None:
        # Three coefficients per formula: fewer prompt lengths or decode points cannot determine them.
        for name in ("prefill_points", "context_points"):
            if getattr(self, name) < 3:
                raise ValueError(f"{name} must be >= 3, got {getattr(self, name)}")
        if self.batch_points < 1 or self.repeats < 1:
            raise ValueError(
                f"batch_points and repeats must be >= 1, got {self.batch_points} and {self.repeats}"
            )
        if self.folds < 2:
            raise ValueError(f"folds must be >= 2, got {self.folds}")


# --- node (instances of one machine) -------------------------------------------------------------

DEFAULT_PROFILE_PATH = "~/.cache/aegaeon/profiles.json"
# "token": aegaeon's token-level scheduling. "request": the baseline it is measured against, where a
# model runs its requests to completion before another is loaded (colocated instances only).
SCHEDULING_POLICIES = ("token", "request")
# How long an idle instance sleeps before looking for work again when nobody wakes it.
DEFAULT_IDLE_WAIT_S = 0.05
# Requests of one model waiting for their first token beyond which a node refuses more (HTTP 429).
DEFAULT_MAX_WAITING_PER_MODEL = 256
# A serving node keeps its newest ended requests (for latency histograms and the dashboard's window) and
# each instance's newest timeline events, no more: a node that runs for weeks must not grow. Running
# totals keep the counters exact past these.
DEFAULT_ENDED_HISTORY = 4096
DEFAULT_TIMELINE_EVENTS = 8192


@dataclass(frozen=True)
class NodeConfig:
    """One machine: its devices, how its instances split the work, and what each instance runs with."""

    device: str = "cpu"
    # The devices the node gives its instances (aegaeon/instance/devices.py): a spec such as "0-7",
    # "0,2,4" or "cpu,cpu", or a list; normalized to the devices' names ("cuda:0", "cpu:1"). None:
    # every visible GPU on CUDA; on the CPU one device per tensor-parallel rank.
    devices: str | tuple[str, ...] | None = None
    dtype: str = "float32"
    # Colocated: each instance both prefills and decodes. Otherwise prefill and decode instances.
    colocated: bool = True
    colocated_instances: int = 1
    policy: str = "token"
    prefill_instances: int = 1
    decode_instances: int = 1
    # Ranks (processes, one device each) of every instance: its models' weights, KV and compute are
    # split over them (tensor parallelism); 1 runs each instance in one process on one device.
    tensor_parallel_size: int = 1
    # Latency profiles (per model shape, dtype and device) the scheduler predicts with; instances
    # measure the shapes missing from it when they start.
    profile_path: str = DEFAULT_PROFILE_PATH
    idle_wait_s: float = DEFAULT_IDLE_WAIT_S
    # Admission: a model with this many requests waiting for their first token refuses new ones
    # (the client gets 429 and Retry-After), so a burst cannot queue without bound.
    max_waiting_per_model: int = DEFAULT_MAX_WAITING_PER_MODEL
    # Shedding: a request still waiting for its prefill this many seconds after arriving is failed
    # with an error that says so (None: never; every accepted request is served however late).
    shed_waiting_after_s: float | None = None
    # Ended requests, and timeline events per instance, the node holds (the newest ones).
    ended_history: int = DEFAULT_ENDED_HISTORY
    timeline_events: int = DEFAULT_TIMELINE_EVENTS
    engine: EngineConfig = EngineConfig()
    memory: MemoryConfig = MemoryConfig()
    scheduler: SchedulerConfig = SchedulerConfig()

    def __post_init__(self) -> None:
        counts = (
            {"colocated_instances": self.colocated_instances}
            if self.colocated
            else {"prefill_instances": self.prefill_instances, "decode_instances": self.decode_instances}
        )
        counts["tensor_parallel_size"] = self.tensor_parallel_size
        for name, value in counts.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.devices is not None:
            devices = parse_devices(self.devices, device_type(self.device))
            object.__setattr__(self, "devices", devices)  # frozen: the normalized spec replaces the given one
            if ":" in self.device and device_type(self.device) != "cpu":
                raise ValueError(
                    f"device {self.device!r} names one GPU; with a devices list, set device to "
                    f"{device_type(self.device)!r}"
                )
            if self.tensor_parallel_size > len(devices):
                raise ValueError(
                    f"tensor_parallel_size {self.tensor_parallel_size} needs that many distinct devices "
                    f"per instance; devices lists {len(devices)} ({', '.join(devices)})"
                )
        if self.policy not in SCHEDULING_POLICIES:
            raise ValueError(f"policy must be one of {SCHEDULING_POLICIES}, got {self.policy!r}")
        if self.policy == "request" and not self.colocated:
            raise ValueError("the request-level policy runs on colocated instances only")
        if self.max_waiting_per_model < 1:
            raise ValueError(f"max_waiting_per_model must be >= 1, got {self.max_waiting_per_model}")
        for name in ("ended_history", "timeline_events"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.shed_waiting_after_s is not None and self.shed_waiting_after_s <= 0:
            raise ValueError(f"shed_waiting_after_s must be positive, got {self.shed_waiting_after_s}")


# --- serving (`aegaeon serve`: flags over an optional YAML file) ---------------------------------

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
# What one `aegaeon serve` process runs: an api server and a node together, or one of them (several
# machines sharing a Redis metadata store).
ROLES = ("all", "api", "node")
# How `aegaeon serve` writes its log: readable lines, or one JSON object per line (aegaeon/logs.py).
LOG_FORMATS = ("text", "json")
DEFAULT_DRAIN_TIMEOUT_S = 30.0
# A finished, failed or aborted request's record stays in the metadata store this long, then is
# dropped (a client may still read its outcome meanwhile: resume, retrieval, the dashboard).
DEFAULT_FINISHED_TTL_S = 3600.0
# The environment variable `aegaeon serve` takes the admin key from when no --admin-key is given.
ADMIN_KEY_ENV = "AEGAEON_ADMIN_KEY"


# Structured outputs (engine/grammar.py): compiled grammars a model keeps, least recently used dropped.
GRAMMAR_CACHE_SIZE = 64


# Request limits of the OpenAI api server (docs/api.md, "Limits").
DEFAULT_MAX_BODY_BYTES = 4 * MIB
DEFAULT_MAX_N = 16


@dataclass(frozen=True)
class ApiLimits:
    """How large a request the api server accepts; a request over a limit gets a 4xx that names it."""

    # Bytes of one request body (413 above it), from Content-Length and counted while reading.
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # Choices (`n`) one generation request may ask for.
    max_n: int = DEFAULT_MAX_N
    # Prompt tokens of one generation request; None: what the model's context holds (max_model_len - 1).
    max_prompt_tokens: int | None = None
    # Tokens one choice may generate (`max_tokens`, `max_completion_tokens`); None: the room left in the
    # context. An explicit value above it is refused; a request that gives none is capped at it.
    max_output_tokens: int | None = None
    # Generation requests one API key (or, without keys, one client address) may send per minute,
    # as a token bucket; None: no limit. Beyond it: 429 with Retry-After.
    requests_per_minute: int | None = None

    def __post_init__(self) -> None:
        optional = ("max_prompt_tokens", "max_output_tokens", "requests_per_minute")
        for name in ("max_body_bytes", "max_n", *optional):
            value = getattr(self, name)
            if value is None and name in optional:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")


# --- node liveness and failover ---
DEFAULT_HEARTBEAT_INTERVAL_S = 1.0
# A node that has not beaten for this long is taken as gone: its requests move to another node.
DEFAULT_NODE_TIMEOUT_S = 10.0
# What a 503 for a model whose nodes are all down tells clients to wait (Retry-After).
DEFAULT_NO_NODE_RETRY_AFTER_S = 5.0


@dataclass(frozen=True)
class LivenessConfig:
    """How often nodes beat, when a silent one counts as gone, and when its models may be tried again."""

    heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S
    node_timeout_s: float = DEFAULT_NODE_TIMEOUT_S
    no_node_retry_after_s: float = DEFAULT_NO_NODE_RETRY_AFTER_S

    def __post_init__(self) -> None:
        if self.heartbeat_interval_s <= 0:
            raise ValueError(f"heartbeat_interval_s must be > 0, got {self.heartbeat_interval_s}")
        if self.node_timeout_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"node_timeout_s ({self.node_timeout_s}) must exceed heartbeat_interval_s "
                f"({self.heartbeat_interval_s}): a live node would look gone between beats"
            )
        if self.no_node_retry_after_s < 0:
            raise ValueError(f"no_node_retry_after_s must be >= 0, got {self.no_node_retry_after_s}")


@dataclass(frozen=True)
class ModelEntry:
    """A served model: the name clients use, a local HF directory or a hub id, and its priority."""

    name: str
    path: str
    priority: float = DEFAULT_PRIORITY

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "priority", check_weight(f"the priority of model {self.name!r}", self.priority)
        )


# An API key is named by this prefix and the start of its SHA-256 in logs, metrics and the scheduler:
# the key itself (a secret) goes nowhere but the check of the Authorization header.
API_KEY_ID_PREFIX = "key-"
API_KEY_ID_HEX_DIGITS = 12


def api_key_id(key: str) -> str:
    """The id of an API key: `key-` and the first hex digits of its SHA-256 (not the secret)."""
    return API_KEY_ID_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:API_KEY_ID_HEX_DIGITS]


def is_api_key_id(name: str) -> bool:
    """Whether `name` has the form of an API key id."""
    digits = name.removeprefix(API_KEY_ID_PREFIX)
    return (
        name.startswith(API_KEY_ID_PREFIX)
        and len(digits) == API_KEY_ID_HEX_DIGITS
        and all(c in "0123456789abcdef" for c in digits)
    )


@dataclass(frozen=True)
class ServeConfig:
    """Everything `aegaeon serve` runs with."""

    models: tuple[ModelEntry, ...]
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    # Clients must send `Authorization: Bearer <key>` with one of these keys when any is set.
    api_keys: tuple[str, ...] = ()
    # Weights of API keys by key id (`api_key_id`): a key's share of each model's waiting queue.
    # A key not listed weighs DEFAULT_KEY_WEIGHT.
    api_key_weights: tuple[tuple[str, float], ...] = ()
    limits: ApiLimits = ApiLimits()
    role: str = "all"
    # The metadata store shared by api servers and nodes; None keeps it in this process (role "all").
    redis_url: str | None = None
    # Where a node takes requests from api servers (on `host`); 0 picks a free port.
    node_port: int = 0
    # On SIGTERM, how long requests in flight may run on before the server stops anyway.
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    # How long the metadata store keeps an ended request's record (memory it holds grows with
    # the request rate times this).
    finished_ttl_s: float = DEFAULT_FINISHED_TTL_S
    # A `--role node` process serves /metrics and /dashboard on this port (None: it does not; 0: any).
    metrics_port: int | None = None
    # "text" lines, or one JSON object per line (with request ids) for log pipelines.
    log_format: str = "text"
    # The directory of the cluster's CURVE keys (`aegaeon keys DIR`; else $AEGAEON_CLUSTER_KEYS): nodes
    # encrypt their port and admit only api servers holding the api key.
    cluster_keys: str | None = None
    # A node without keys listens on loopback only, unless this says the network is trusted.
    insecure: bool = False
    node: NodeConfig = NodeConfig()
    # --- the live model registry ---
    # Holders of this key may add and remove models while serving (`/v1/admin/...`); None: no admin
    # routes (they answer 404). Separate from the API keys, which never grant it.
    admin_key: str | None = None
    # --- node liveness and failover ---
    liveness: LivenessConfig = LivenessConfig()

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if self.role != "all" and self.redis_url is None:
            raise ValueError(
                f"role {self.role!r} shares the cluster through Redis: give redis_url (--redis-url)"
            )
        if self.role == "api" and self.models:
            raise ValueError("an api server serves the models its nodes register: name models on the nodes")
        if self.role != "api" and not self.models:
            raise ValueError("name at least one model to serve (NAME=PATH, or a path)")
        if not 0 <= self.node_port < 65536:
            raise ValueError(f"node_port must be in [0, 65535], got {self.node_port}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log_format must be one of {', '.join(LOG_FORMATS)}, got {self.log_format!r}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
        if self.finished_ttl_s <= 0:
            raise ValueError(f"finished_ttl_s must be positive, got {self.finished_ttl_s}")
        names = [model.name for model in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.admin_key is not None and self.admin_key in self.api_keys:
            raise ValueError("admin_key must differ from every API key: an API key grants no admin rights")
        for key_id, weight in self.api_key_weights:
            if not is_api_key_id(key_id):
                raise ValueError(f"api_key_weights: {key_id!r} is not an API key id ({API_KEY_ID_PREFIX}...)")
            check_weight(f"the weight of API key {key_id}", weight)


# Settings a YAML file (and the matching flags) may give, by the config record they belong to.
_ENGINE_KEYS = ("max_num_seqs", "max_num_batched_tokens", "kv_cache_bytes", "max_model_len")
_MEMORY_KEYS = (
    "device_memory_fraction",
    "cpu_arena_bytes",
    "host_model_cache_bytes",
    "host_kv_pool_bytes",
    "kv_slab_bytes",
    "load_chunk_bytes",
    "shm_dir",
    "host_memory_fraction",
    "host_kv_pool_fraction",
    "disk_read_threads",
    "disk_read_chunk_bytes",
    "host_cache_wait_s",
)
_NODE_KEYS = (
    "device",
    "devices",
    "dtype",
    "colocated",
    "colocated_instances",
    "prefill_instances",
    "decode_instances",
    "tensor_parallel_size",
    "profile_path",
    "max_waiting_per_model",
    "shed_waiting_after_s",
    "ended_history",
    "timeline_events",
)
_SLO_KEYS = ("ttft_s", "tbt_s")
_SCHEDULER_KEYS = (
    "max_group_size",
    "qmax_s",
    "qmax_max_s",
    "alpha_floor",
    "max_switch_share",
    "kv_lookahead_tokens",
)
_LIVENESS_KEYS = ("heartbeat_interval_s", "node_timeout_s", "no_node_retry_after_s")
_LIMIT_KEYS = ("max_body_bytes", "max_n", "max_prompt_tokens", "max_output_tokens", "requests_per_minute")
# ServeConfig fields taken from the settings as they are.
_SERVE_FIELD_KEYS = (
    "host",
    "port",
    "role",
    "redis_url",
    "node_port",
    "drain_timeout_s",
    "finished_ttl_s",
    "metrics_port",
    "log_format",
    "cluster_keys",
    "insecure",
    "admin_key",
)
# ... and those read into other fields: the model entries, the API keys.
_SERVE_KEYS = ("models", "api_key", "api_key_file", "api_key_weights", *_SERVE_FIELD_KEYS)
_MODEL_ENTRY_KEYS = ("name", "path", "priority", *_SLO_KEYS)


def default_model_name(path: str) -> str:
    """The name a model is served under when none is given: the last part of its path or hub id."""
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def parse_model_entry(value: str | dict) -> tuple[ModelEntry, SLO | None]:
    """`NAME=PATH`, a path or hub id (named by its last part), or a YAML mapping with an optional SLO."""
    if isinstance(value, dict):
        unknown = set(value) - set(_MODEL_ENTRY_KEYS)
        if unknown or "path" not in value:
            raise ValueError(
                f"a model entry needs 'path' (and may have name, priority, ttft_s, tbt_s); got {value}"
            )
        path = str(value["path"])
        name = str(value.get("name") or default_model_name(path))
        slo = (
            SLO(**{k: float(value[k]) for k in _SLO_KEYS if k in value})
            if set(_SLO_KEYS) & set(value)
            else None
        )
        return ModelEntry(name, path, value.get("priority", DEFAULT_PRIORITY)), slo
    name, sep, path = str(value).partition("=")
    if not sep:
        path, name = name, default_model_name(name)
    if not name or not path:
        raise ValueError(f"a model is NAME=PATH or a path, got {value!r}")
    return ModelEntry(name, path), None


def known_settings() -> frozenset[str]:
    """Every key a YAML config (and `build_serve_config`) accepts."""
    return frozenset(
        {
            *_SERVE_KEYS,
            *_ENGINE_KEYS,
            *_MEMORY_KEYS,
            *_NODE_KEYS,
            *_SLO_KEYS,
            *_LIMIT_KEYS,
            *_SCHEDULER_KEYS,
            *_LIVENESS_KEYS,
        }
    )


def build_serve_config(settings: dict) -> ServeConfig:
    """A ServeConfig from flat settings (a YAML file's mapping with flags laid over it)."""
    known = known_settings()
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    entries = [parse_model_entry(value) for value in settings.get("models") or []]
    default_slo = SLO(**{k: float(settings[k]) for k in _SLO_KEYS if settings.get(k) is not None})
    model_slos = tuple((entry.name, slo) for entry, slo in entries if slo is not None)
    priorities = tuple(
        (entry.name, entry.priority) for entry, _ in entries if entry.priority != DEFAULT_PRIORITY
    )

    def pick(keys: tuple[str, ...]) -> dict:
        return {k: settings[k] for k in keys if settings.get(k) is not None}

    node = NodeConfig(
        **pick(_NODE_KEYS),
        engine=EngineConfig(**pick(_ENGINE_KEYS)),
        memory=MemoryConfig(**pick(_MEMORY_KEYS)),
        scheduler=SchedulerConfig(
            default_slo=default_slo,
            model_slos=model_slos,
            model_priorities=priorities,
            **pick(_SCHEDULER_KEYS),
        ),
    )
    keys = [settings["api_key"]] if settings.get("api_key") else []
    if settings.get("api_key_file"):
        keys += read_api_keys(settings["api_key_file"])
    return ServeConfig(
        models=tuple(entry for entry, _ in entries),
        node=node,
        api_keys=tuple(keys),
        api_key_weights=key_weights(settings.get("api_key_weights") or {}, keys),
        limits=ApiLimits(**pick(_LIMIT_KEYS)),
        liveness=LivenessConfig(**{k: float(v) for k, v in pick(_LIVENESS_KEYS).items()}),
        **pick(_SERVE_FIELD_KEYS),
    )


def key_weights(weights: object, keys: list[str]) -> tuple[tuple[str, float], ...]:
    """`api_key_weights` (a mapping of API keys, or their ids, to weights) by key id.

    A key the server holds may be named itself; it is turned into its id at once. A server without the
    keys (a node) names them by id.
    """
    if not isinstance(weights, dict):
        raise ValueError("api_key_weights must map API keys (or their ids, key-...) to weights")
    ids = {api_key_id(key) for key in keys}
    by_id = {}
    for name, weight in weights.items():
        name = str(name)
        if name in keys:
            name = api_key_id(name)
        elif not is_api_key_id(name) or (keys and name not in ids):
            # The entry may be a mistyped secret: it is not repeated in the error.
            raise ValueError(
                "api_key_weights names a key that is neither a configured API key nor the id of one "
                f"({API_KEY_ID_PREFIX}..., as the server logs at start)"
            )
        by_id[name] = check_weight(f"the weight of API key {name}", weight)
    return tuple(by_id.items())


def read_api_keys(path: str) -> list[str]:
    """The keys of a keys file: one per line; blank lines and lines starting with # are skipped."""
    try:
        with open(path) as keys_file:
            keys = [line.strip() for line in keys_file if line.strip() and not line.lstrip().startswith("#")]
    except OSError as error:
        raise ValueError(f"cannot read the API keys file {path}: {error.strerror}") from None
    if not keys:
        raise ValueError(f"the API keys file {path} holds no key (one per line)")
    return keys
