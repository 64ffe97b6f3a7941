"""Decode throughput of the engine against `transformers` and against the compute ceiling.

    python benchmarks/engine.py [--json] [--repeats 3] [--model-dir DIR] [--compare-attention]

The model is Llama-shaped, about 100M parameters (hidden 768, 8 layers, 12 heads / 4 KV heads,
intermediate 2048, vocab 32k), random weights, float32 on the CPU. It is written once to
`--model-dir` and reused.

Three numbers per batch size, measured side by side in one process, each a median of `--repeats`:
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
  (every weight matrix of one forward pass, at that batch size), as tokens per second.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
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
CEILING_REPEATS = 30
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


def aegaeon_decode_rate(engine: LLMEngine, requests: list[Request], batch_size: int) -> float:
    """Decode tokens/s over the steps that ran exactly `batch_size` sequences."""
    for i, request in enumerate(requests):
        params = SamplingParams(temperature=0, max_tokens=request.output_len, ignore_eos=True)
        engine.add_request(f"bench-{i}", request.prompt, params)
    tokens, seconds = 0, 0.0
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
    return tokens / seconds


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


def ceiling_rate(engine: LLMEngine, batch_size: int) -> float:
    """Tokens/s if a decode step cost only its matrix products."""
    matrices = list(engine.runner.weights.matrices())
    inputs = {w.shape[1]: torch.randn(batch_size, w.shape[1], dtype=w.dtype) for w in matrices}

    def products() -> None:
        for weight in matrices:
            F.linear(inputs[weight.shape[1]], weight)

    products()
    times = []
    for _ in range(CEILING_REPEATS):
        start = time.perf_counter()
        products()
        times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument(
        "--compare-attention", action="store_true", help="also run decode attention on the torch path"
    )
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    model_dir = ensure_benchmark_model(args.model_dir, SEED)
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    results = {}
    for batch_size in BATCH_SIZES:
        config = EngineConfig(max_num_seqs=batch_size)
        engine = LLMEngine(model_dir, config=config)
        rng = random.Random(SEED)
        count = batch_size * REQUESTS_PER_SLOT[batch_size]
        requests = make_requests(count, BENCHMARK_MODEL_SHAPE["vocab_size"], rng)
        runs = {"aegaeon": [], "transformers": [], "ceiling": []}
        if args.compare_attention:
            runs["aegaeon-gather"] = []
            gather_engine = LLMEngine(model_dir, config=config)
            gather_engine.runner.paged_decode = None
        for _ in range(args.repeats):
            runs["aegaeon"].append(aegaeon_decode_rate(engine, requests, batch_size))
            if args.compare_attention:
                runs["aegaeon-gather"].append(aegaeon_decode_rate(gather_engine, requests, batch_size))
            runs["transformers"].append(transformers_decode_rate(hf_model, requests, batch_size))
            runs["ceiling"].append(ceiling_rate(engine, batch_size))
        results[f"batch_{batch_size}"] = {name: round(statistics.median(v), 2) for name, v in runs.items()}

    if args.json:
        print(json.dumps(results))
        return
    print(f"decode tokens/s, median of {args.repeats} ({torch.get_num_threads()} threads)")
    print(f"{'':10}{'aegaeon':>10}{'transformers':>14}{'ceiling':>10}{'aegaeon/ceil':>14}{'hf/ceil':>9}")
    for name, r in results.items():
        print(
            f"{name:10}{r['aegaeon']:>10.1f}{r['transformers']:>14.1f}{r['ceiling']:>10.1f}"
            f"{r['aegaeon'] / r['ceiling']:>14.0%}{r['transformers'] / r['ceiling']:>9.0%}"
        )
    if args.compare_attention:
        print("decode attention on the torch path (gather + SDPA) instead of the paged kernel:")
        for name, r in results.items():
            print(f"{name:10}{r['aegaeon-gather']:>10.1f}{r['aegaeon-gather'] / r['ceiling']:>38.0%}")


if __name__ == "__main__":
    main()
