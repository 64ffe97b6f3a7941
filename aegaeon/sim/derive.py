"""Latency profiles derived from public numbers (roofline with efficiency factors), for GPUs we lack.

    decode step   a = overhead + weights / (HBM · η_mem)      weights are read once per step
                  b = KV bytes per token / (HBM · η_mem)     each context token's K and V read once
                  c = 2 · params / (peak · η_compute)        each sequence's matmul FLOPs
    prefill       a = overhead + weights / (HBM · η_mem)
                  b = 2 · params / (peak · η_compute)        FLOPs per prompt token
                  c = 2 · layers · q_width / (peak · η_compute)   causal attention, per length²
    switch        weights / (host link · η_link)             one copy from pinned host memory

The result is an ordinary `Profile`, the same record `aegaeon profile` measures, so a measured file
can replace these numbers wholesale (`aegaeon simulate --profiles FILE`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from aegaeon.scheduler.predictor import Profile, ProfileStore
from aegaeon.sim.catalog import GPUSpec, ModelShape, load_catalog

PROFILE_DTYPE = "bfloat16"
BUNDLED_PROFILES_FILE = "gpu_profiles.json"
DEFAULT_HOST_LINK_EFFICIENCY = 0.5
# The paper artifact's planner estimates a switch at 3-5 s for 7-13B models on an H100: weights over
# about 5 GB/s, this share of PCIe Gen5 x16 (`aegaeon simulate --link-efficiency`).
ARTIFACT_HOST_LINK_EFFICIENCY = 0.08


@dataclass(frozen=True)
class Efficiency:
    """How close real kernels get to the roofline (assumptions, see docs/simulation.md)."""

    # Share of HBM bandwidth a decode step's weight and KV reads reach (vLLM-class kernels: 0.7-0.8).
    memory: float = 0.75
    # Model FLOPs utilisation of prefill and of the per-sequence part of a decode step.
    compute: float = 0.5
    # Fixed seconds per step: kernel launches, sampling, the scheduler's own work.
    step_overhead_s: float = 0.0015
    # Share of the host link's datasheet bandwidth a weight load or KV move reaches. 8-GPU H100
    # servers (HGX/DGX H100) hang two GPUs off each PCIe switch, whose one Gen5 x16 uplink to the host
    # they share when both load at once: half the link each (a lone pinned copy reaches 80-90%).
    host_link: float = DEFAULT_HOST_LINK_EFFICIENCY

    def __post_init__(self) -> None:
        if not (0 < self.memory <= 1 and 0 < self.compute <= 1 and 0 < self.host_link <= 1):
            raise ValueError("efficiencies must be in (0, 1]")
        if self.step_overhead_s < 0:
            raise ValueError("step_overhead_s must be >= 0")


def derive_profile(shape: ModelShape, gpu: GPUSpec, efficiency: Efficiency = Efficiency()) -> Profile:
    """The profile of `shape` in bfloat16 on `gpu`, from the formulas in this module's docstring."""
    weights = shape.weight_bytes(PROFILE_DTYPE)
    memory_bw = gpu.hbm_bytes_per_s * efficiency.memory
    flops = gpu.bf16_flops * efficiency.compute
    weight_read_s = weights / memory_bw
    per_token_flops_s = 2 * shape.num_parameters() / flops
    attention_s = 2 * shape.num_layers * shape.num_heads * shape.head_dim / flops
    return Profile(
        shape_key=shape.shape_key,
        dtype=PROFILE_DTYPE,
        device=gpu.device,
        prefill=(efficiency.step_overhead_s + weight_read_s, per_token_flops_s, attention_s),
        decode=(
            efficiency.step_overhead_s + weight_read_s,
            shape.kv_bytes_per_token(PROFILE_DTYPE) / memory_bw,
            per_token_flops_s,
        ),
        switch_s=weights / (gpu.host_link_bytes_per_s * efficiency.host_link),
    )


def derive_bundled_profiles(
    efficiency: Efficiency = Efficiency(), gpus: Iterable[str] | None = None
) -> ProfileStore:
    """Profiles of every catalogue model on every catalogue GPU (what gpu_profiles.json holds)."""
    catalog = load_catalog()
    store = ProfileStore()
    for gpu_name in gpus or catalog.gpus:
        for shape in catalog.models.values():
            store.add(derive_profile(shape, catalog.gpu(gpu_name), efficiency))
    return store
