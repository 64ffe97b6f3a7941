"""Latency profiles derived from public numbers (roofline with efficiency factors), for GPUs we lack.

    decode step   a = overhead + weights / (HBM · η_mem)      weights are read once per step
                  b = KV bytes per token / (HBM · η_mem)     each context token's K and V read once
                  c = 2 · params / (peak · η_compute)        each sequence's matmul FLOPs
    prefill       a = overhead + weights / (HBM · η_mem)
                  b = 2 · params / (peak · η_compute)        FLOPs per prompt token
                  c = 2 · layers · q_width / (peak · η_compute)   causal attention, per length²
    switch        weights / (host link · η_link)             one copy from pinned host memory

With tensor parallelism over k ranks (Megatron-LM: Shoeybi et al. 2019, "Megatron-LM: Training
Multi-Billion Parameter Language Models Using Model Parallelism", section 3), each rank holds 1/k of
every matrix and of the KV heads, so the weight read, the FLOPs, the KV read and the switch's copy are
each divided by k (the ranks work and copy in parallel, each over its own host link). Each layer adds
two all-reduces of the activations (after the attention's and the MLP's row-parallel products), which
a ring all-reduce completes in 2·(k−1)/k · bytes over the GPU-to-GPU link (Patarasuk and Yuan 2009,
"Bandwidth optimal all-reduce algorithms for clusters of workstations"):

    all-reduce    a += 2 · layers · latency                  one small collective's fixed cost
                  decode c, prefill b += 2 · layers · 2(k−1)/k · hidden · dtype / (NVLink · η_nvlink)

The result is an ordinary `Profile`, the same record `aegaeon profile` measures, so a measured file
can replace these numbers wholesale (`aegaeon simulate --profiles FILE`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from aegaeon.scheduler.predictor import Profile, ProfileStore
from aegaeon.sim.catalog import GPUSpec, ModelShape, dtype_bytes, load_catalog

PROFILE_DTYPE = "bfloat16"
BUNDLED_PROFILES_FILE = "gpu_profiles.json"
DEFAULT_HOST_LINK_EFFICIENCY = 0.5
# Megatron-style tensor parallelism all-reduces the activations twice per layer in a forward pass.
ALL_REDUCES_PER_LAYER = 2
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
    # Share of the NVLink datasheet bandwidth (per direction) a ring all-reduce's bus bandwidth
    # reaches: below the 460-480 GB/s that published nccl-tests all_reduce_perf reference numbers
    # give 8 H100 SXM5 for large messages, as decode's messages (batch × hidden) are small.
    nvlink: float = 0.8
    # Fixed seconds of one small all-reduce inside an NVLink node (launch and synchronisation),
    # assumed: the order of nccl-tests' times for messages of a few KB; not measured here.
    all_reduce_latency_s: float = 10e-6

    def __post_init__(self) -> None:
        if not all(0 < share <= 1 for share in (self.memory, self.compute, self.host_link, self.nvlink)):
            raise ValueError("efficiencies must be in (0, 1]")
        if self.step_overhead_s < 0 or self.all_reduce_latency_s < 0:
            raise ValueError("step_overhead_s and all_reduce_latency_s must be >= 0")


def all_reduce_costs(
    shape: ModelShape, gpu: GPUSpec, tp: int, efficiency: Efficiency = Efficiency()
) -> tuple[float, float]:
    """A forward pass's all-reduces over `tp` ranks: (seconds per step, seconds per token)."""
    if tp == 1:
        return 0.0, 0.0
    if gpu.nvlink_bytes_per_s <= 0:
        raise ValueError(f"{gpu.name} has no GPU-to-GPU link in the catalogue: no tensor parallelism on it")
    per_pass = ALL_REDUCES_PER_LAYER * shape.num_layers
    ring_bytes = 2 * (tp - 1) / tp * shape.hidden_size * dtype_bytes(PROFILE_DTYPE)
    return (
        per_pass * efficiency.all_reduce_latency_s,
        per_pass * ring_bytes / (gpu.nvlink_bytes_per_s * efficiency.nvlink),
    )


def derive_profile(
    shape: ModelShape, gpu: GPUSpec, efficiency: Efficiency = Efficiency(), tp: int = 1
) -> Profile:
    """The profile of `shape` in bfloat16 on `gpu` (an instance of `tp` of them), from the formulas in
    this module's docstring; its switch time is one rank's, all ranks copying at once."""
    weights = shape.shard_weight_bytes(PROFILE_DTYPE, tp)
    memory_bw = gpu.hbm_bytes_per_s * efficiency.memory
    flops = gpu.bf16_flops * efficiency.compute
    weight_read_s = weights / memory_bw
    per_token_flops_s = 2 * shape.num_parameters() / tp / flops
    attention_s = 2 * shape.num_layers * (shape.num_heads // tp) * shape.head_dim / flops
    reduce_step_s, reduce_token_s = all_reduce_costs(shape, gpu, tp, efficiency)
    fixed_s = efficiency.step_overhead_s + weight_read_s + reduce_step_s
    return Profile(
        shape_key=shape.shape_key,
        dtype=PROFILE_DTYPE,
        device=gpu.device,
        prefill=(fixed_s, per_token_flops_s + reduce_token_s, attention_s),
        decode=(
            fixed_s,
            shape.kv_bytes_per_token(PROFILE_DTYPE, tp) / memory_bw,
            per_token_flops_s + reduce_token_s,
        ),
        switch_s=weights / (gpu.host_link_bytes_per_s * efficiency.host_link),
    )


def derive_bundled_profiles(
    efficiency: Efficiency = Efficiency(), gpus: Iterable[str] | None = None, tp: int = 1
) -> ProfileStore:
    """Profiles of every catalogue model that `tp` ranks can shard, on every catalogue GPU (with the
    defaults, what gpu_profiles.json holds: one device per instance)."""
    catalog = load_catalog()
    store = ProfileStore()
    for gpu_name in gpus or catalog.gpus:
        for shape in catalog.models.values():
            try:
                shape.check_tensor_parallel(tp)
            except ValueError:
                continue
            store.add(derive_profile(shape, catalog.gpu(gpu_name), efficiency, tp))
    return store
