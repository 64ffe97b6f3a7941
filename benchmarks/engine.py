"""Decode throughput and prefill time of the engine against `transformers` (and the compute ceiling).

    python benchmarks/engine.py [--json] [--repeats 3] [--model-dir DIR] [--compare-attention]
                                [--sections decode,prefill] [--dtypes float32,bfloat16] [--threads N]

The model is Llama-shaped, about 100M parameters (hidden 768, 8 layers, 12 heads / 4 KV heads,
intermediate 2048, vocab 32k), random weights, on the CPU. It is written once to `--model-dir` and
reused.

Decode: three numbers per dtype and batch size, measured side by side in one process, each a median
of `--repeats`; engine, transformers and ceiling all run in that dtype:
- aegaeon: decode tokens per second over the decode steps that ran at exactly that batch size.
  Requests have mixed prompt and output lengths; with `max_num_seqs` equal to the batch size and
  more requests than slots, continuous batching keeps the batch full while requests come and go,
  and every full decode step counts, including those right after a newcomer joined. Prefill steps
  are not counted (they are not decode).
- transformers: `model.generate` (greedy) on the same weights and prompts. Batch 1 runs each
  request alone; batch 16 runs the first 16 requests in one left-padded batch. Decode time is
  `t(generate N tokens) - t(generate 1 token)`, which removes the prefill.
- aegaeon-gather (with --compare-attention): the engine with decode attention on the torch path
  (gather + SDPA) instead of the paged kernel, in the same process and repeats.
- ceiling: the compute floor of this machine: the time of the model's own matrix products alone
  (every weight matrix of one forward pass, at that batch size, `F.linear` on the engine's own
  weight tensors), as tokens per second. One pass of them is timed right after each counted engine
  step, and the rate is tokens over the summed pass times, as the engine's is over its summed step
  times: on a shared machine both then see the same load (timed apart, a burst of other work that
  hits one and not the other moves their ratio several-fold).

Prefill (float32): the time to prefill ONE prompt of each of `PREFILL_LENGTHS` tokens, i.e. the
engine steps from adding the request to its first token, against a plain `model(input_ids)` forward
in transformers on the same ids (which also computes the LM head at every position). The two
alternate within each repeat; medians of `--repeats` (at least `MIN_PREFILL_REPEATS`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from aegaeon.config import EngineConfig
from aegaeon.demo import BENCHMARK_MODEL_SHAPE, ensure_benchmark_model
from aegaeon.engine.engine import LLMEngine
from aegaeon.engine.sampling_params import SamplingParams

DEFAULT_MODEL_DIR = Path(".bench/llama-100m")
PROMPT_LENGTHS = (16, 256)
OUTPUT_LENGTHS = (32, 160)
BATCH_SIZES = (1, 16)
REQUESTS_PER_SLOT = {1: 4, 16: 3}
PREFILL_LENGTHS = (512, 2000)
MIN_PREFILL_REPEATS = 5
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SECTIONS = ("decode", "prefill")
SEED = 0


@dataclass
class Request:
    prompt: list[int]
    output_len: int


def make_requests(count: int, vocab_size: int, rng: random.Random) -> list[Request]:
    return [
        Request(
            prompt=[rng.randrange(vocab_size) for _ in range(rng.randint(*PROMPT_LENGTHS))],
            output_len=rng.randint(*OUTPUT_LENGTHS),
        )
        for _ in range(count)
    ]


def aegaeon_decode_rate(
    engine: LLMEngine, requests: list[Request], batch_size: int, products: Callable[[], None] | None = None
) -> tuple[float, float | None]:
    """Decode tokens/s over the steps that ran exactly `batch_size` sequences, and (given
    `products`) the ceiling: tokens/s of one `products()` pass timed after each of those steps."""
    for i, request in enumerate(requests):
        params = SamplingParams(temperature=0, max_tokens=request.output_len, ignore_eos=True)
        engine.add_request(f"bench-{i}", request.prompt, params)
    tokens, seconds, product_seconds = 0, 0.0, 0.0
    while engine.has_unfinished_requests():
        # With `batch_size` (= max_num_seqs) sequences running nothing can be admitted, so the step
        # decodes them all, whether or not requests wait for a slot; it is counted when it returned
        # one token per sequence (a preemption would have shrunk it).
        full = len(engine.model().batcher.running) == batch_size
        start = time.perf_counter()
        outputs = engine.step()
        elapsed = time.perf_counter() - start
        if full and len(outputs) == batch_size:
            tokens += batch_size
            seconds += elapsed
            if products is not None:
                start = time.perf_counter()
                products()
                product_seconds += time.perf_counter() - start
    return tokens / seconds, tokens / product_seconds if products is not None else None


def transformers_decode_rate(model, requests: list[Request], batch_size: int) -> float:
    """Decode tokens/s of `generate`, prefill subtracted."""
    from transformers import GenerationConfig

    def generate(batch: list[Request], new_tokens: int) -> float:
        width = max(len(r.prompt) for r in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, request in enumerate(batch):  # left padding, as generate expects
            ids[row, width - len(request.prompt) :] = torch.tensor(request.prompt)
            mask[row, width - len(request.prompt) :] = 1
        config = GenerationConfig(
            do_sample=False, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0
        )
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        return time.perf_counter() - start

    tokens, seconds = 0, 0.0
    # Batch 1: every request alone. Batch > 1: one padded batch of the first `batch_size` requests.
    batches = [[r] for r in requests] if batch_size == 1 else [requests[:batch_size]]
    for batch in batches:
        new_tokens = max(r.output_len for r in batch)
        seconds += generate(batch, new_tokens) - generate(batch, 1)
        tokens += len(batch) * (new_tokens - 1)
    return tokens / seconds


def matrix_products(engine: LLMEngine, batch_size: int) -> Callable[[], None]:
    """One decode step's matrix products alone, on the engine's weights (what the ceiling times)."""
    matrices = list(engine.model().runner.weights.matrices())
    inputs = {w.shape[1]: torch.randn(batch_size, w.shape[1], dtype=w.dtype) for w in matrices}

    def products() -> None:
        with torch.inference_mode():
            for weight in matrices:
                F.linear(inputs[weight.shape[1]], weight)

    products()  # first-call costs (oneDNN primitive creation) out of the way
    return products


def decode_section(model_dir: Path, dtype: torch.dtype, repeats: int, compare_attention: bool) -> dict:
    """Decode tokens/s per batch size in `dtype`: aegaeon, transformers, ceiling (medians)."""
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    results = {}
    for batch_size in BATCH_SIZES:
        config = EngineConfig(max_num_seqs=batch_size)
        engine = LLMEngine(model_dir, config=config, dtype=dtype)
        rng = random.Random(SEED)
        count = batch_size * REQUESTS_PER_SLOT[batch_size]
        requests = make_requests(count, BENCHMARK_MODEL_SHAPE["vocab_size"], rng)
        runs = {"aegaeon": [], "transformers": [], "ceiling": []}
        products = matrix_products(engine, batch_size)
        if compare_attention:
            runs["aegaeon-gather"] = []
            gather_engine = LLMEngine(model_dir, config=config, dtype=dtype)
            gather_engine.model().runner.paged_decode = None
        for _ in range(repeats):
            aegaeon, ceiling = aegaeon_decode_rate(engine, requests, batch_size, products)
            runs["aegaeon"].append(aegaeon)
            runs["ceiling"].append(ceiling)
            if compare_attention:
                runs["aegaeon-gather"].append(aegaeon_decode_rate(gather_engine, requests, batch_size)[0])
            runs["transformers"].append(transformers_decode_rate(hf_model, requests, batch_size))
        results[f"batch_{batch_size}"] = {name: round(statistics.median(v), 2) for name, v in runs.items()}
    return results


def aegaeon_prefill_seconds(engine: LLMEngine, prompt: list[int], request_id: str) -> float:
    """Seconds of the engine steps from a new prompt to its first token (its whole prefill)."""
    engine.add_request(request_id, prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - start


def transformers_prefill_seconds(model, prompt: list[int]) -> float:
    ids = torch.tensor([prompt])
    start = time.perf_counter()
    with torch.inference_mode():
        model(ids)
    return time.perf_counter() - start


def prefill_section(model_dir: Path, repeats: int) -> dict:
    """Seconds to prefill one prompt per length: aegaeon and transformers (medians), and their ratio."""
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    engine = LLMEngine(model_dir)
    rng = random.Random(SEED)
    ids = itertools.count()
    results = {}
    for length in PREFILL_LENGTHS:
        prompt = [rng.randrange(BENCHMARK_MODEL_SHAPE["vocab_size"]) for _ in range(length)]
        aegaeon_prefill_seconds(engine, prompt, f"warm-{next(ids)}")  # first-call costs out of the way
        transformers_prefill_seconds(hf_model, prompt)
        ours, theirs = [], []
        for _ in range(max(repeats, MIN_PREFILL_REPEATS)):
            ours.append(aegaeon_prefill_seconds(engine, prompt, f"prefill-{next(ids)}"))
            theirs.append(transformers_prefill_seconds(hf_model, prompt))
        aegaeon_s, transformers_s = statistics.median(ours), statistics.median(theirs)
        results[f"tokens_{length}"] = {
            "aegaeon_s": round(aegaeon_s, 4),
            "transformers_s": round(transformers_s, 4),
            "speedup": round(transformers_s / aegaeon_s, 3),
        }
    return results


def print_decode(dtype: str, results: dict, repeats: int, compare_attention: bool) -> None:
    print(f"decode tokens/s, {dtype}, median of {repeats} ({torch.get_num_threads()} threads)")
    print(f"{'':10}{'aegaeon':>10}{'transformers':>14}{'ceiling':>10}{'aegaeon/ceil':>14}{'hf/ceil':>9}")
    for name, r in results.items():
        print(
            f"{name:10}{r['aegaeon']:>10.1f}{r['transformers']:>14.1f}{r['ceiling']:>10.1f}"
            f"{r['aegaeon'] / r['ceiling']:>14.0%}{r['transformers'] / r['ceiling']:>9.0%}"
        )
    if compare_attention:
        print("decode attention on the torch path (gather + SDPA) instead of the paged kernel:")
        for name, r in results.items():
            print(f"{name:10}{r['aegaeon-gather']:>10.1f}{r['aegaeon-gather'] / r['ceiling']:>38.0%}")


def print_prefill(results: dict, repeats: int) -> None:
    print(f"prefill of one prompt, float32, seconds, median of {max(repeats, MIN_PREFILL_REPEATS)}")
    print(f"{'':12}{'aegaeon':>10}{'transformers':>14}{'hf/aegaeon':>12}")
    for name, r in results.items():
        print(f"{name:12}{r['aegaeon_s']:>10.4f}{r['transformers_s']:>14.4f}{r['speedup']:>11.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument(
        "--compare-attention", action="store_true", help="also run decode attention on the torch path"
    )
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated: decode, prefill")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="decode dtypes, comma-separated")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sections = args.sections.split(",")
    dtypes = args.dtypes.split(",")
    for name in sections:
        if name not in SECTIONS:
            parser.error(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")
    for name in dtypes:
        if name not in DTYPES:
            parser.error(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")

    model_dir = ensure_benchmark_model(args.model_dir, SEED)
    results: dict[str, dict] = {}
    if "decode" in sections:
        results["decode"] = {
            name: decode_section(model_dir, DTYPES[name], args.repeats, args.compare_attention)
            for name in dtypes
        }
    if "prefill" in sections:
        results["prefill"] = prefill_section(model_dir, args.repeats)

    if args.json:
        print(json.dumps(results))
        return
    for dtype, decode in results.get("decode", {}).items():
        print_decode(dtype, decode, args.repeats, args.compare_attention)
    if "prefill" in results:
        print_prefill(results["prefill"], args.repeats)


if __name__ == "__main__":
    main()
