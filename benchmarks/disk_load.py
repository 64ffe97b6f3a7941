"""Reading a checkpoint into the host model cache, against `cat` (cold) and a memcpy (warm).

    python benchmarks/disk_load.py [--json] [--repeats 5] [--model-dir DIR] [--shm-dir /dev/shm]

The checkpoint is the 100M benchmark model in float32 (~400 MB of safetensors, written on first use
as benchmarks/engine.py does). Each round, side by side:

- cold load: the file's pages are dropped from the page cache (`posix_fadvise(DONTNEED)`), then the
  model is read into the host model cache exactly as an engine does on a miss (`acquire` with the
  engine's fill: the checkpoint's pieces read by `read_pieces`);
- cold cat: the pages dropped again, then `cat FILE > /dev/null`;
- warm load: the same load with the file in the page cache;
- warm memcpy: one memcpy (`ctypes.memmove`) of the same bytes from ordinary memory into the same
  place of the cache.

The cache holds one model, so every load evicts the previous one and fills the same (already
faulted-in) pages. Reported: median seconds, GB/s, and the ratios cat/load (cold) and memcpy/load
(warm); 1.0 means the load runs at the speed of its baseline.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

from aegaeon.config import MemoryConfig
from aegaeon.demo import ensure_benchmark_model
from aegaeon.engine.architecture import Architecture
from aegaeon.engine.weights import canonical_shapes, checkpoint_files, checkpoint_pieces
from aegaeon.memory.checkpoint import read_pieces
from aegaeon.memory.model_cache import HostModelCache, plan_layout

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / ".bench" / "llama-100m"
DTYPE = torch.float32


def drop_from_page_cache(files: list[Path]) -> None:
    for file in files:
        descriptor = os.open(file, os.O_RDONLY)
        try:
            os.fsync(descriptor)  # dirty pages are not dropped
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--shm-dir", default=MemoryConfig().shm_dir)
    args = parser.parse_args()

    memory = MemoryConfig(shm_dir=args.shm_dir)
    model_dir = ensure_benchmark_model(args.model_dir)
    arch = Architecture.from_pretrained(model_dir)
    files = checkpoint_files(model_dir)
    shapes = canonical_shapes(arch)
    nbytes = plan_layout(shapes, DTYPE)[1]
    cache = HostModelCache.create(args.shm_dir, nbytes)

    def fill(entry, layout, progress) -> None:  # what the engine's fill does (engine/residency.py)
        pieces = checkpoint_pieces(model_dir, arch, DTYPE, layout.tensors)
        read_pieces(pieces, entry, memory.disk_read_threads, memory.disk_read_chunk_bytes, progress)

    loads = iter(range(1 << 30))

    def load() -> float:
        start = time.perf_counter()
        cache.acquire(f"round-{next(loads)}", shapes, DTYPE, fill, progress=False, pin=False)
        return time.perf_counter() - start

    # The bytes of the checkpoint in ordinary memory, for the memcpy baseline (and a warm-up load
    # that faults the cache's pages in).
    source = torch.empty(nbytes, dtype=torch.uint8)
    load()
    source.copy_(cache.buffer[:nbytes])
    target = cache.buffer[:nbytes]

    def memcpy() -> float:
        start = time.perf_counter()
        ctypes.memmove(target.data_ptr(), source.data_ptr(), nbytes)
        return time.perf_counter() - start

    def cat() -> float:
        start = time.perf_counter()
        subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"cold_load": [], "cold_cat": [], "warm_load": [], "warm_memcpy": []}
    for _ in range(args.repeats):
        drop_from_page_cache(files)
        times["cold_load"].append(load())
        drop_from_page_cache(files)
        times["cold_cat"].append(cat())
        times["warm_load"].append(load())
        times["warm_memcpy"].append(memcpy())
    cache.close()

    medians = {name: statistics.median(values) for name, values in times.items()}
    file_bytes = sum(file.stat().st_size for file in files)
    result = {
        "model_bytes": nbytes,
        "file_bytes": file_bytes,
        "repeats": args.repeats,
        "shm_dir": args.shm_dir,
        "disk_read_threads": memory.disk_read_threads,
        "median_s": medians,
        "gb_per_s": {
            name: (file_bytes if name == "cold_cat" else nbytes) / s / 1e9 for name, s in medians.items()
        },
        "cold_ratio": medians["cold_cat"] / medians["cold_load"],
        "warm_ratio": medians["warm_memcpy"] / medians["warm_load"],
        "all_s": times,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"checkpoint {file_bytes / 1e6:.0f} MB ({nbytes / 1e6:.0f} MB of weights) -> {args.shm_dir}, "
        f"{args.repeats} rounds, medians:"
    )
    for name, seconds in medians.items():
        print(f"  {name:12s} {seconds:7.3f} s  {result['gb_per_s'][name]:6.2f} GB/s")
    print(f"cold: cat / load   = {result['cold_ratio']:.2f}  (goal >= 0.8)")
    print(f"warm: memcpy / load = {result['warm_ratio']:.2f}  (goal >= 0.8)")


if __name__ == "__main__":
    main()
