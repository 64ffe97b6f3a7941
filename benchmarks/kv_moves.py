"""KV swaps of a full batch through the engine, against a plain memcpy of the same bytes.

    python benchmarks/kv_moves.py [--json] [--repeats 7] [--device cpu] [--model-dir DIR]

On the 100M benchmark model (benchmarks/engine.py; float32, 256 KiB KV blocks) 16 requests of 512
prompt tokens are prefilled, then swapped out to the host KV pool and back in, all 16 in one call of
the engine's public `swap_out` / `swap_in` (as an instance places a batch), `--repeats` times (after
one warm-up round that faults the pool's pages in). Side by side in the same rounds, the baseline
copies one contiguous tensor of the same total bytes each way with `copy_` (device to host, then
host to device). Reported: the median time of each, and memcpy time / swap time (1.0: the swaps move
KV as fast as one memcpy).

Uses only the engine's public API. (Checkouts before 2026-12-05 took one request per call: their own
copy of this file loops over the requests.)
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from aegaeon.config import MIB, EngineConfig, MemoryConfig
from aegaeon.demo import BENCHMARK_MODEL_SHAPE, ensure_benchmark_model
from aegaeon.engine.engine import LLMEngine
from aegaeon.engine.sampling_params import SamplingParams
from aegaeon.memory.kv_pool import HostKVPool

# Next to this file's checkout, so running it with another checkout's interpreter writes nothing there.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / ".bench" / "llama-100m"
REQUESTS = 16
PROMPT_TOKENS = 512
BLOCK_TOKENS = 16
SEED = 0


def kv_bytes_per_token() -> int:
    shape = BENCHMARK_MODEL_SHAPE
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    return shape["num_hidden_layers"] * 2 * shape["num_key_value_heads"] * head_dim * 4  # float32


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(action: Callable[[], None], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    action()
    synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    shm_dir = tempfile.mkdtemp(prefix="aegaeon-kv-moves-", dir="/dev/shm")
    try:
        run(shm_dir)
    finally:
        shutil.rmtree(shm_dir, ignore_errors=True)


def run(shm_dir: str) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    args = parser.parse_args()
    device = torch.device(args.device)

    batch_bytes = REQUESTS * PROMPT_TOKENS * kv_bytes_per_token()
    model_dir = ensure_benchmark_model(args.model_dir, SEED)
    # Room for the batch twice on each side: a swap-in never waits for the swap-out's blocks.
    pool = HostKVPool.create(shm_dir, "kv-pool", nbytes=2 * batch_bytes, slab_bytes=64 * MIB)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the pool is pinned from the current device's context
        pool.pin()
    engine = LLMEngine(
        model_dir,
        device=device,
        config=EngineConfig(
            max_num_seqs=REQUESTS, max_num_batched_tokens=PROMPT_TOKENS * 4, kv_cache_bytes=2 * batch_bytes
        ),
        memory=MemoryConfig(shm_dir=shm_dir),
        kv_pool=pool,
        progress=False,
    )
    rng = random.Random(SEED)
    ids = [f"r{i}" for i in range(REQUESTS)]
    # Two tokens each: after its prefill a request stays on the device with 512 tokens of KV.
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    for request_id in ids:
        prompt = [rng.randrange(BENCHMARK_MODEL_SHAPE["vocab_size"]) for _ in range(PROMPT_TOKENS)]
        engine.add_request(request_id, prompt, params)
    while not all(engine.on_device(request_id) for request_id in ids):
        engine.step()

    def swap_out() -> None:
        engine.swap_out(*ids)

    def swap_in() -> None:
        engine.swap_in(*ids)

    host_kwargs = {"pin_memory": True} if device.type == "cuda" else {}
    host = torch.ones(batch_bytes, dtype=torch.uint8, **host_kwargs)
    on_device = torch.ones(batch_bytes, dtype=torch.uint8, device=device)
    runs: dict[str, list[float]] = {"swap_out": [], "swap_in": [], "memcpy_out": [], "memcpy_in": []}
    for round_ in range(args.repeats + 1):
        times = {
            "swap_out": timed(swap_out, device),
            "memcpy_out": timed(lambda: host.copy_(on_device), device),
            "swap_in": timed(swap_in, device),
            "memcpy_in": timed(lambda: on_device.copy_(host), device),
        }
        if round_ > 0:  # round 0 faults the pool's and the buffers' pages in
            for name, seconds in times.items():
                runs[name].append(seconds)
    ratios = [
        (runs["memcpy_out"][i] + runs["memcpy_in"][i]) / (runs["swap_out"][i] + runs["swap_in"][i])
        for i in range(args.repeats)
    ]
    result = {name: round(statistics.median(values) * 1e3, 2) for name, values in runs.items()}
    result = {f"{name}_ms": value for name, value in result.items()}
    result.update(
        bytes_each_way=batch_bytes,
        blocks=REQUESTS * PROMPT_TOKENS // BLOCK_TOKENS,
        memcpy_over_swap=round(statistics.median(ratios), 3),
        device=str(device),
        repeats=args.repeats,
    )
    if args.json:
        print(json.dumps(result))
        return
    mib = batch_bytes / MIB
    print(
        f"{REQUESTS} requests x {PROMPT_TOKENS} tokens: {mib:.0f} MiB of KV each way, {result['blocks']} "
        f"blocks; medians of {args.repeats} rounds on {device}"
    )
    for name in ("swap_out", "swap_in", "memcpy_out", "memcpy_in"):
        ms = result[f"{name}_ms"]
        print(f"  {name:11}{ms:>9.2f} ms  {mib / 1024 / (ms / 1e3):>6.2f} GiB/s")
    print(f"  memcpy time / swap time (median of rounds): {result['memcpy_over_swap']:.2f}")


if __name__ == "__main__":
    main()
