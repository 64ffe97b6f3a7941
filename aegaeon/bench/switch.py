"""`aegaeon bench switch`: what a model switch costs, phase by phase, against a cold start and memcpy.

Three numbers for the same model bytes, measured side by side in one run (medians):
- switch_s: scaling a model up from the host cache inside a running engine whose arena holds one
  model, so every switch evicts the other one and copies all the weights in. Each model has a
  request in flight; it is swapped in, decoded two steps and swapped out around each switch.
- cold_s: serving the same model the way a user does without aegaeon (Ollama, llama-swap): a
  fresh process that loads the checkpoint and produces its first token.
- memcpy_s: one plain copy of `model_bytes` bytes on this device: the physical limit.

With `--tensor-parallel-size N` the same switches also run on an engine of N ranks (processes),
side by side: each rank copies its shard (`bytes_per_rank`, about 1/N of the model), all at once,
and a switch ends when every rank's copy has. That engine runs without a host KV pool, so there
the request's KV is recomputed after each switch instead of swapped (the switch time excludes it).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from aegaeon.config import MIB, EngineConfig, MemoryConfig
from aegaeon.demo import ensure_benchmark_model
from aegaeon.engine.architecture import Architecture
from aegaeon.engine.engine import LLMEngine
from aegaeon.engine.parallel.lockstep import TensorParallelEngine
from aegaeon.engine.parallel.shards import Shard
from aegaeon.engine.residency import weight_bytes
from aegaeon.engine.sampling_params import SamplingParams
from aegaeon.memory.arena import align
from aegaeon.memory.kv_pool import HostKVPool

DEFAULT_MODEL_ROOT = Path(".bench")
KV_BYTES = 64 * MIB
HOST_KV_POOL_BYTES = 256 * MIB
KV_SLAB_BYTES = 64 * MIB
PROMPT_TOKENS = 64
COLD_START_SCRIPT = """
import sys
from aegaeon import LLM, SamplingParams
LLM(model=sys.argv[1], device=sys.argv[2]).generate([[1, 2, 3]], SamplingParams(max_tokens=1))
"""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_switches(paths: dict[str, Path], device: torch.device, repeats: int) -> dict:
    """Median switch time and phases inside a running engine that holds one model at a time."""
    model_bytes = max(
        weight_bytes(Architecture.from_pretrained(path), torch.float32) for path in paths.values()
    )
    with tempfile.TemporaryDirectory(dir=MemoryConfig().shm_dir) as shm:
        pool = HostKVPool.create(shm, "bench-kv", HOST_KV_POOL_BYTES, KV_SLAB_BYTES)
        pool.pin()
        engine = LLMEngine(
            models=paths,
            device=device,
            config=EngineConfig(kv_cache_bytes=KV_BYTES),
            memory=MemoryConfig(cpu_arena_bytes=align(KV_BYTES) + model_bytes),
            kv_pool=pool,
            progress=False,
        )
        names = list(paths)
        for name in names:
            engine.switch_to(name)
            engine.add_request(name, list(range(1, PROMPT_TOKENS + 1)), SamplingParams(max_tokens=None), name)
            engine.step()
            engine.swap_out(name)
        totals, phases, swap_out, swap_in = [], [], [], []
        for turn in range(repeats + 1):  # the first round warms up
            name = names[turn % len(names)]
            _sync(device)
            start = time.perf_counter()
            engine.switch_to(name)
            _sync(device)
            elapsed = time.perf_counter() - start
            started = time.perf_counter()
            engine.swap_in(name)
            engine.step()
            _sync(device)
            swapped_in = time.perf_counter() - started
            engine.step()
            started = time.perf_counter()
            engine.swap_out(name)
            _sync(device)
            swapped_out = time.perf_counter() - started
            if turn and engine.residency.last_switch.loaded:
                totals.append(elapsed)
                phases.append(engine.residency.last_switch)
                swap_in.append(swapped_in)
                swap_out.append(swapped_out)
        for name in names:
            engine.abort_request(name)
        del engine
        pool.close()
    if not totals:
        raise RuntimeError("no switch loaded weights: the arena held both models")
    return {
        "model_bytes": model_bytes,
        "switch_s": statistics.median(totals),
        "phases": {
            "drain_s": statistics.median(p.drain_s for p in phases),
            "load_s": statistics.median(p.load_s for p in phases),
            "bind_s": statistics.median(p.bind_s for p in phases),
        },
        "swap_in_and_step_s": statistics.median(swap_in),
        "swap_out_s": statistics.median(swap_out),
    }


def measure_tp_switches(paths: dict[str, Path], device: torch.device, repeats: int, size: int) -> dict:
    """Median switch time inside a running engine of `size` ranks that holds one model at a time."""
    bytes_per_rank = max(
        weight_bytes(Architecture.from_pretrained(path), torch.float32, Shard(rank, size))
        for path in paths.values()
        for rank in range(size)
    )
    engine = TensorParallelEngine(
        models=paths,
        tensor_parallel_size=size,
        device=device,
        config=EngineConfig(kv_cache_bytes=KV_BYTES),
        memory=MemoryConfig(cpu_arena_bytes=align(KV_BYTES) + bytes_per_rank),
        progress=False,
    )
    try:
        names = list(paths)
        for name in names:
            engine.switch_to(name)
            engine.add_request(name, list(range(1, PROMPT_TOKENS + 1)), SamplingParams(max_tokens=None), name)
            engine.step()
        totals, loads = [], []
        for turn in range(repeats + 1):  # the first round warms up
            name = names[turn % len(names)]
            engine.synchronize()
            _sync(device)
            start = time.perf_counter()
            engine.switch_to(name)
            engine.synchronize()  # every rank's copy has ended
            elapsed = time.perf_counter() - start
            engine.step()
            if turn and engine.residency.last_switch.loaded:
                totals.append(elapsed)
                loads.append(engine.residency.last_switch.load_s)
        for name in names:
            engine.abort_request(name)
    finally:
        engine.close()
    if not totals:
        raise RuntimeError("no switch loaded weights: the arena held both models")
    return {
        "size": size,
        "bytes_per_rank": bytes_per_rank,
        "switch_s": statistics.median(totals),
        "rank0_load_s": statistics.median(loads),
    }


def measure_cold_start(path: Path, device: torch.device, repeats: int) -> float:
    """Median wall time of a fresh process that loads the model and generates one token."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", COLD_START_SCRIPT, str(path), str(device)], check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_memcpy(nbytes: int, device: torch.device, repeats: int) -> float:
    """Median time of one plain copy of `nbytes` (host to device on CUDA, host to host on the CPU)."""
    source = torch.ones(nbytes, dtype=torch.uint8).pin_memory() if device.type == "cuda" else None
    source = source if source is not None else torch.ones(nbytes, dtype=torch.uint8)
    target = torch.ones(nbytes, dtype=torch.uint8, device=device)
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        target.copy_(source, non_blocking=True)
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def run(
    model_root: Path, device: str, repeats: int, cold_repeats: int, tensor_parallel_size: int = 1
) -> dict:
    device = torch.device(device)
    paths = {
        "a": ensure_benchmark_model(model_root / "llama-100m", seed=0),
        "b": ensure_benchmark_model(model_root / "llama-100m-b", seed=1),
    }
    result = measure_switches(paths, device, repeats)
    result["bytes_per_rank"] = result["model_bytes"]
    if tensor_parallel_size > 1:
        result["tensor_parallel"] = measure_tp_switches(paths, device, repeats, tensor_parallel_size)
    result["cold_s"] = measure_cold_start(paths["a"], device, cold_repeats)
    result["memcpy_s"] = measure_memcpy(result["model_bytes"], device, repeats)
    result["cold_over_switch"] = result["cold_s"] / result["switch_s"]
    result["memcpy_over_switch"] = result["memcpy_s"] / result["switch_s"]
    result["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result["threads"] = torch.get_num_threads()
    return result


def print_report(result: dict) -> None:
    mb = result["model_bytes"] / MIB
    print(f"model switch on {result['device']}: {mb:.0f} MiB of weights, medians")
    print(f"  switch          {result['switch_s'] * 1e3:9.1f} ms")
    for phase, seconds in result["phases"].items():
        print(f"    {phase:<12}  {seconds * 1e3:9.1f} ms")
    print(f"  swap-in + step  {result['swap_in_and_step_s'] * 1e3:9.1f} ms")
    print(f"  swap-out        {result['swap_out_s'] * 1e3:9.1f} ms")
    print(
        f"  cold start      {result['cold_s'] * 1e3:9.1f} ms   ({result['cold_over_switch']:.0f}x the switch)"
    )
    print(
        f"  memcpy          {result['memcpy_s'] * 1e3:9.1f} ms   "
        f"(the switch runs at {result['memcpy_over_switch']:.0%} of memcpy speed)"
    )
    parallel = result.get("tensor_parallel")
    if parallel is not None:
        size = parallel["size"]
        print(f"tensor parallelism, side by side: {'':14} TP=1       TP={size}")
        print(
            f"  bytes copied per rank     {result['bytes_per_rank'] / MIB:9.1f} MiB "
            f"{parallel['bytes_per_rank'] / MIB:9.1f} MiB "
            f"({parallel['bytes_per_rank'] / result['bytes_per_rank']:.2f} of TP=1)"
        )
        print(
            f"  switch (all ranks)        {result['switch_s'] * 1e3:9.1f} ms  "
            f"{parallel['switch_s'] * 1e3:9.1f} ms  "
            f"({parallel['switch_s'] / result['switch_s']:.2f} of TP=1)"
        )


def main(args) -> None:
    result = run(
        Path(args.model_root), args.device, args.repeats, args.cold_repeats, args.tensor_parallel_size
    )
    if args.json:
        print(json.dumps(result))
    else:
        print_report(result)
