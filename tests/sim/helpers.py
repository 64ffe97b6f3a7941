"""Small builders shared by the simulator tests: toy models with round-number latencies."""

from __future__ import annotations

from collections.abc import Sequence

from aegaeon.scheduler.models import ModelSpec
from aegaeon.scheduler.predictor import Profile
from aegaeon.sim.cluster import ClusterConfig, MemoryConfig, NodeLayout
from aegaeon.sim.models import ModelSet
from aegaeon.sim.workload import Arrival

GB = 10**9


def toy_models(
    names: Sequence[str],
    step_s: float = 0.01,
    prefill_s: float = 0.02,
    switch_s: float = 0.5,
    weight_bytes: int = GB,
    kv_block_bytes: int = 1000,
    max_model_len: int = 4096,
    device: str = "toy",
) -> ModelSet:
    """Models whose decode step and prefill take constant time, whatever the batch."""
    specs = {n: ModelSpec(n, f"shape-{n}", weight_bytes, kv_block_bytes, max_model_len) for n in names}
    profiles = {
        n: Profile(f"shape-{n}", "bfloat16", device, (prefill_s, 0.0, 0.0), (step_s, 0.0, 0.0), switch_s)
        for n in names
    }
    return ModelSet(specs, profiles)


def cluster(*nodes: NodeLayout, device_bytes: int = 100 * GB, kv_bytes: int | None = None) -> ClusterConfig:
    return ClusterConfig(
        tuple(nodes), MemoryConfig(device_bytes=device_bytes, fraction=1.0, kv_bytes=kv_bytes)
    )


def arrivals(*rows: tuple[float, str, int, int]) -> list[Arrival]:
    return [Arrival(*row) for row in rows]
