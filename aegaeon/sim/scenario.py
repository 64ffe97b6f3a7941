"""A simulation scenario: which devices, how they are laid out, which model kinds, which knobs.

Turns the few things a user states (GPUs, GPU type or a profile file, model mix) into the
`ModelSet` and `ClusterConfig` a run needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from aegaeon.config import DEFAULT_KV_CACHE_BYTES, SchedulerConfig
from aegaeon.scheduler.predictor import ProfileStore
from aegaeon.sim.catalog import load_catalog
from aegaeon.sim.cluster import (
    DEFAULT_GPUS_PER_NODE,
    ClusterConfig,
    MemoryConfig,
    colocated_nodes,
    node_sizes,
    split_nodes,
)
from aegaeon.sim.derive import DEFAULT_HOST_LINK_EFFICIENCY, Efficiency, derive_bundled_profiles
from aegaeon.sim.models import (
    DEFAULT_GPU,
    PAPER_KINDS,
    PAPER_MIX,
    ModelSet,
    build_model_set,
    devices_of,
    load_profiles,
)
from aegaeon.sim.result import SimResult
from aegaeon.sim.runner import SimOptions, simulate
from aegaeon.sim.workload import Arrival, workload_models


@dataclass(frozen=True)
class Scenario:
    """Everything about a run except the workload and the policy."""

    gpus: int = 16
    gpus_per_node: int = DEFAULT_GPUS_PER_NODE
    # Devices of each node, when they differ (None: `gpus` in nodes of `gpus_per_node`); sets `gpus`.
    node_devices: tuple[int, ...] | None = None
    # Devices per instance (None: the catalogue's for the chosen kinds, which must agree; 1 with a
    # profile file). Every instance of the pool has this size; models are sharded over its ranks.
    tensor_parallel_size: int | None = None
    # aegaeon's split: share of each node's devices that prefill (None: the paper's 3 of 8).
    prefill_share: float | None = None
    colocated: bool = False
    gpu: str = DEFAULT_GPU
    # A profile file written by `aegaeon profile` (None: the bundled, derived GPU profiles).
    profiles: str | None = None
    # The profiles' device name (None: the catalogue GPU's, or the only device in the file).
    device: str | None = None
    kinds: tuple[str, ...] | None = PAPER_KINDS
    mix: tuple[float, ...] | None = PAPER_MIX
    # KV region per device (None: what a GPU's memory leaves; the engine's default elsewhere).
    kv_bytes: int | None = None
    # Share of the host link a load or KV move reaches (None: the bundled profiles' own,
    # derive.DEFAULT_HOST_LINK_EFFICIENCY); re-derives the bundled profiles, so not with `profiles`.
    link_efficiency: float | None = None
    scheduler: SchedulerConfig = SchedulerConfig()
    options: SimOptions = field(default_factory=SimOptions)

    def __post_init__(self) -> None:
        if self.node_devices is not None:
            if not self.node_devices or min(self.node_devices) < 1:
                raise ValueError(f"every node needs at least one device, got {list(self.node_devices)}")
            object.__setattr__(self, "gpus", sum(self.node_devices))

    def with_gpus(self, gpus: int) -> Scenario:
        return Scenario(**{**self.__dict__, "gpus": gpus, "node_devices": None})

    def tp(self) -> int:
        """Devices per instance: as given, else the catalogue's for the chosen model kinds."""
        if self.tensor_parallel_size is not None:
            catalog = load_catalog()
            for kind in self.kinds or ():
                if kind.lower() in (name.lower() for name in catalog.models):
                    try:
                        catalog.model(kind).check_tensor_parallel(self.tensor_parallel_size)
                    except ValueError as error:
                        raise ValueError(f"{kind}: {error}") from None
            if self.tensor_parallel_size < 1:
                raise ValueError(f"tensor parallel size must be >= 1, got {self.tensor_parallel_size}")
            return self.tensor_parallel_size
        if self.profiles is not None or not self.kinds:
            return 1
        catalog = load_catalog()
        sizes = {kind: catalog.default_tensor_parallel(kind) for kind in self.kinds}
        if len(set(sizes.values())) > 1:
            listed = ", ".join(f"{kind} at {tp}" for kind, tp in sizes.items())
            raise ValueError(
                f"the catalogue serves {listed}; a simulated pool has one tensor parallel size: "
                "give it (tensor_parallel_size)"
            )
        return next(iter(sizes.values()))

    def device_name(self) -> str:
        if self.device is not None:
            return self.device
        if self.profiles is None:
            return load_catalog().gpu(self.gpu).device
        devices = devices_of(load_profiles(self.profiles))
        if len(devices) == 1:
            return devices[0]
        catalog_device = load_catalog().gpu(self.gpu).device
        if catalog_device in devices:
            return catalog_device
        raise ValueError(
            f"{self.profiles} profiles several devices ({', '.join(devices)}): pick one with --device"
        )

    def model_set(self, models: Sequence[str]) -> ModelSet:
        """The models mapped onto kinds in sorted name order, so a trace and its synthetic twin agree."""
        models = sorted(set(models))
        store = self.profile_store()
        kinds, mix = self.kinds, self.mix
        if self.profiles is not None and kinds == PAPER_KINDS:
            kinds, mix = None, None  # a measured file: every kind it holds, in equal parts
        return build_model_set(models, store, self.device_name(), kinds, mix, self.tp())

    def profile_store(self) -> ProfileStore:
        tp = self.tp()
        if self.link_efficiency is None and tp == 1:
            return load_profiles(self.profiles)
        if self.profiles is not None:
            raise ValueError(
                "a link efficiency or a tensor parallel size re-derives the bundled profiles; a profile "
                "file holds its own, measured on one device each"
            )
        link = DEFAULT_HOST_LINK_EFFICIENCY if self.link_efficiency is None else self.link_efficiency
        return derive_bundled_profiles(Efficiency(host_link=link), tp=tp)

    def memory(self, device: str) -> MemoryConfig:
        for spec in load_catalog().gpus.values():
            if spec.device.lower() == device.lower():
                return MemoryConfig(device_bytes=spec.memory_bytes, kv_bytes=self.kv_bytes)
        return MemoryConfig(kv_bytes=self.kv_bytes or DEFAULT_KV_CACHE_BYTES)

    def cluster(self, device: str) -> ClusterConfig:
        sizes = (
            list(self.node_devices)
            if self.node_devices is not None
            else node_sizes(self.gpus, self.gpus_per_node)
        )
        nodes = (
            colocated_nodes(sizes, self.tp())
            if self.colocated
            else split_nodes(sizes, self.prefill_share, self.tp())
        )
        return ClusterConfig(nodes, self.memory(device))

    def run(self, policy: str, arrivals: Sequence[Arrival], models: ModelSet | None = None) -> SimResult:
        """Simulate `policy` over the arrivals in this scenario."""
        models = models or self.model_set(workload_models(arrivals))
        return simulate(policy, arrivals, models, self.cluster(models.device), self.scheduler, self.options)
