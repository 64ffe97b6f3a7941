"""The simulated pool: nodes, the role of each instance, and how each device's memory is divided.

An instance of tensor parallel size k spans k devices of its node; its ranks are alike (each holds
1/k of every model and of its KV), so one rank stands for all: memory figures here are per device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from aegaeon.config import (
    DEFAULT_DEVICE_MEMORY_FRACTION,
    DEFAULT_MAX_NUM_BATCHED_TOKENS,
    DEFAULT_MAX_NUM_SEQS,
)

# The paper's main setup: 16 GPUs as two nodes of 3 prefill + 5 decode instances.
PAPER_NODES = 2
PAPER_PREFILL_PER_NODE = 3
PAPER_DECODE_PER_NODE = 5
DEFAULT_GPUS_PER_NODE = PAPER_PREFILL_PER_NODE + PAPER_DECODE_PER_NODE
# Copies of the largest model the arena keeps room for beside the KV region: the active one and a
# prefetched next one (as the engine's arena on a CPU).
RESIDENT_MODEL_SLOTS = 2


@dataclass(frozen=True)
class NodeLayout:
    """The instances of one node: prefill + decode (disaggregated) or colocated ones, each on
    `tensor_parallel_size` devices of its own."""

    prefill: int = 0
    decode: int = 0
    colocated: int = 0
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if min(self.prefill, self.decode, self.colocated) < 0:
            raise ValueError("instance counts must be >= 0")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.colocated and (self.prefill or self.decode):
            raise ValueError("a node is either colocated or split into prefill and decode instances")
        if not self.colocated and (self.prefill < 1 or self.decode < 1):
            raise ValueError(
                "a split node needs at least one prefill and one decode instance, "
                f"got {self.prefill}P+{self.decode}D"
            )

    @property
    def instances(self) -> int:
        return self.prefill + self.decode + self.colocated

    @property
    def gpus(self) -> int:
        return self.instances * self.tensor_parallel_size

    def describe(self) -> str:
        roles = f"{self.colocated}C" if self.colocated else f"{self.prefill}P+{self.decode}D"
        return roles if self.tensor_parallel_size == 1 else f"{roles} TP{self.tensor_parallel_size}"


def node_sizes(gpus: int, gpus_per_node: int = DEFAULT_GPUS_PER_NODE) -> list[int]:
    """Devices of each node: nodes of `gpus_per_node`, the last one smaller."""
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    if gpus_per_node < 1:
        raise ValueError(f"gpus_per_node must be >= 1, got {gpus_per_node}")
    rest = [gpus % gpus_per_node] if gpus % gpus_per_node else []
    return [gpus_per_node] * (gpus // gpus_per_node) + rest


def _instances_of(size: int, tp: int) -> int:
    if tp < 1:
        raise ValueError(f"tensor parallel size must be >= 1, got {tp}")
    if size < 1 or size % tp:
        raise ValueError(f"a node of {size} devices does not split into instances of {tp} devices")
    return size // tp


def split_nodes(
    sizes: Sequence[int], prefill_share: float | None = None, tp: int = 1
) -> tuple[NodeLayout, ...]:
    """Nodes of the given device counts, each cut into instances of `tp` devices and those split in the
    paper's 3:5 ratio (at least one of each role). A node of one instance is colocated (it must do
    both). `prefill_share` overrides the 3/8 split."""
    share = PAPER_PREFILL_PER_NODE / DEFAULT_GPUS_PER_NODE if prefill_share is None else prefill_share
    if not 0 < share < 1:
        raise ValueError(f"prefill_share must be in (0, 1), got {share}")
    if not sizes:
        raise ValueError("a cluster needs at least one node")
    nodes = []
    for size in sizes:
        instances = _instances_of(size, tp)
        if instances == 1:
            nodes.append(NodeLayout(colocated=1, tensor_parallel_size=tp))
            continue
        prefill = min(max(round(instances * share), 1), instances - 1)
        nodes.append(NodeLayout(prefill=prefill, decode=instances - prefill, tensor_parallel_size=tp))
    return tuple(nodes)


def layout_for_gpus(
    gpus: int, gpus_per_node: int = DEFAULT_GPUS_PER_NODE, prefill_share: float | None = None, tp: int = 1
) -> tuple[NodeLayout, ...]:
    """Nodes of `gpus_per_node` devices (the last one smaller), split as `split_nodes` splits them."""
    return split_nodes(node_sizes(gpus, gpus_per_node), prefill_share, tp)


def colocated_nodes(sizes: Sequence[int], tp: int = 1) -> tuple[NodeLayout, ...]:
    """Nodes of the given device counts, of colocated instances of `tp` devices only."""
    if not sizes:
        raise ValueError("a cluster needs at least one node")
    return tuple(NodeLayout(colocated=_instances_of(size, tp), tensor_parallel_size=tp) for size in sizes)


def colocated_layout(
    gpus: int, gpus_per_node: int = DEFAULT_GPUS_PER_NODE, tp: int = 1
) -> tuple[NodeLayout, ...]:
    """Nodes of colocated instances only."""
    return colocated_nodes(node_sizes(gpus, gpus_per_node), tp)


@dataclass(frozen=True)
class DeviceMemory:
    """How one device's memory splits into KV blocks and model weights (bytes)."""

    kv_bytes: int
    weight_bytes: int

    def __post_init__(self) -> None:
        if self.kv_bytes < 1 or self.weight_bytes < 1:
            raise ValueError(
                f"memory regions must be positive, got kv={self.kv_bytes}, weights={self.weight_bytes}"
            )


@dataclass(frozen=True)
class MemoryConfig:
    """Device memory: either a GPU's size (the arena takes `fraction` of it) or an explicit KV size.

    With `device_bytes`, the arena is `fraction · device_bytes`; the KV region is `kv_bytes` if given,
    else what is left after room for two copies of the largest model. Without it (a CPU), the arena
    is the KV region plus that room, as the engine sizes a CPU arena.
    """

    device_bytes: int | None = None
    fraction: float = DEFAULT_DEVICE_MEMORY_FRACTION
    kv_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.device_bytes is None and self.kv_bytes is None:
            raise ValueError("give the device's memory (device_bytes) or the KV region's size (kv_bytes)")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")

    def arena_bytes(self, largest_model_bytes: int) -> int:
        if self.device_bytes is not None:
            return int(self.device_bytes * self.fraction)
        return self.kv_bytes + RESIDENT_MODEL_SLOTS * largest_model_bytes

    def aegaeon_split(self, largest_model_bytes: int) -> DeviceMemory:
        """KV region and weight room of an aegaeon instance (arena: KV | active model | prefetched)."""
        arena = self.arena_bytes(largest_model_bytes)
        if self.kv_bytes is None and RESIDENT_MODEL_SLOTS * largest_model_bytes >= arena:
            raise ValueError(
                f"a device's {arena}-byte arena cannot hold {RESIDENT_MODEL_SLOTS} copies of a "
                f"{largest_model_bytes}-byte model (the active one and the next) beside any KV: "
                "shard the model over more devices (tensor parallelism)"
            )
        kv = (
            self.kv_bytes if self.kv_bytes is not None else arena - RESIDENT_MODEL_SLOTS * largest_model_bytes
        )
        weights = arena - kv
        if kv < 1 or weights < largest_model_bytes:
            raise ValueError(
                f"a device of {arena} arena bytes cannot hold a {largest_model_bytes}-byte model beside "
                f"{kv} bytes of KV"
            )
        return DeviceMemory(kv, weights)


@dataclass(frozen=True)
class ClusterConfig:
    """The device pool and what every engine on it is allowed."""

    nodes: tuple[NodeLayout, ...]
    memory: MemoryConfig
    max_batch_size: int = DEFAULT_MAX_NUM_SEQS
    max_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ValueError("a cluster needs at least one node")
        if self.max_batch_size < 1 or self.max_batched_tokens < 1:
            raise ValueError("max_batch_size and max_batched_tokens must be >= 1")
        if len({node.tensor_parallel_size for node in self.nodes}) > 1:
            raise ValueError("every instance of a simulated pool has the same tensor parallel size")

    @property
    def gpus(self) -> int:
        return sum(node.gpus for node in self.nodes)

    @property
    def tensor_parallel_size(self) -> int:
        """Devices per instance (per engine of the baselines): each is one scheduling unit."""
        return self.nodes[0].tensor_parallel_size

    @property
    def engines(self) -> int:
        """Instances of `tensor_parallel_size` devices the pool holds (what the baselines deploy on)."""
        return self.gpus // self.tensor_parallel_size

    def describe(self) -> str:
        return " + ".join(node.describe() for node in self.nodes)
