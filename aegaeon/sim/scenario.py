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
    colocated_layout,
    layout_for_gpus,
)
from aegaeon.sim.derive import Efficiency, derive_bundled_profiles
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

    def with_gpus(self, gpus: int) -> Scenario:
        return Scenario(**{**self.__dict__, "gpus": gpus})

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
        return build_model_set(models, store, self.device_name(), kinds, mix)

    def profile_store(self) -> ProfileStore:
        if self.link_efficiency is None:
            return load_profiles(self.profiles)
        if self.profiles is not None:
            raise ValueError(
                "a link efficiency re-derives the bundled profiles; a profile file has its own switches"
            )
        return derive_bundled_profiles(Efficiency(host_link=self.link_efficiency))

    def memory(self, device: str) -> MemoryConfig:
        for spec in load_catalog().gpus.values():
            if spec.device.lower() == device.lower():
                return MemoryConfig(device_bytes=spec.memory_bytes, kv_bytes=self.kv_bytes)
        return MemoryConfig(kv_bytes=self.kv_bytes or DEFAULT_KV_CACHE_BYTES)

    def cluster(self, device: str) -> ClusterConfig:
        nodes = (
            colocated_layout(self.gpus, self.gpus_per_node)
            if self.colocated
            else layout_for_gpus(self.gpus, self.gpus_per_node, self.prefill_share)
        )
        return ClusterConfig(nodes, self.memory(device))

    def run(self, policy: str, arrivals: Sequence[Arrival], models: ModelSet | None = None) -> SimResult:
        """Simulate `policy` over the arrivals in this scenario."""
        models = models or self.model_set(workload_models(arrivals))
        return simulate(policy, arrivals, models, self.cluster(models.device), self.scheduler, self.options)
