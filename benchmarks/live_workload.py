"""The workload the live CPU benchmarks share: tiny models, Poisson arrivals, SLOs scaled to them.

benchmarks/scheduling.py (token- against request-level) and benchmarks/sim_validate.py (the simulator
against the live node) run the same kind of load, so both take it from here.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from aegaeon.config import MIB, SLO
from aegaeon.demo import ensure_small_models

BENCH_DIR = Path(".bench")
PROFILE_PATH = BENCH_DIR / "profiles.json"
MODEL_HIDDEN = 256
MODEL_LAYERS = 4
MODEL_MAX_POSITION = 1024
# The paper's TTFT (10 s) is about 1.4 requests' length and its TBT (100 ms) 4 decode steps; here a
# request lasts about 0.5 s and a step about 5 ms.
SCALED_SLO = SLO(ttft_s=1.0, tbt_s=0.05)
PROMPT_LENGTHS = (16, 128)
OUTPUT_MEAN_TOKENS = 100
OUTPUT_SIGMA = 0.5
OUTPUT_MAX_TOKENS = 300
# How long after the last arrival requests may still finish before the run is cut.
DRAIN_S = 30.0
KV_BYTES = 32 * MIB
# A prompt's token ids are drawn below this (every demo tokenizer's vocabulary holds them).
PROMPT_TOKEN_LIMIT = 900

Arrival = tuple[float, str, list[int], int]


@dataclass(frozen=True)
class LiveScale:
    """The models' size, the KV space and the SLOs scaled to them: what one live run is sized by."""

    name: str
    hidden: int
    layers: int
    kv_bytes: int
    slo: SLO


TINY = LiveScale("tiny", MODEL_HIDDEN, MODEL_LAYERS, KV_BYTES, SCALED_SLO)
# Steps as long as a 7B model's on an H100 (decode ~12 ms, a prefill tens of ms), so the instance
# loop's own fixed costs weigh about as little against them as they do on a GPU. TBT is ten decode
# steps, as the paper's 100 ms is of an H100's ~10 ms; TTFT is a few times a request's prefill and
# first turn, well below a whole request (1-5 s here).
SMALL = LiveScale("small", 768, 8, 128 * MIB, SLO(ttft_s=2.0, tbt_s=0.15))
SCALES = {scale.name: scale for scale in (TINY, SMALL)}


def live_models(prefix: str, count: int, scale: LiveScale = TINY) -> dict[str, Path]:
    """`count` models of `scale` under .bench (written once), named <arch>-<i>."""
    if scale is not TINY:
        prefix = f"{prefix}-{scale.name}"
    return ensure_small_models(BENCH_DIR, prefix, count, scale.hidden, scale.layers, MODEL_MAX_POSITION)


def workload(models: list[str], rate: float, duration: float, seed: int) -> list[Arrival]:
    """(arrival s, model, prompt token ids, output tokens): a Poisson process of `rate` per model."""
    rng = random.Random(seed)
    requests = []
    mu = math.log(OUTPUT_MEAN_TOKENS) - OUTPUT_SIGMA**2 / 2
    for model in models:
        now = rng.expovariate(rate)
        while now < duration:
            prompt = [rng.randrange(3, PROMPT_TOKEN_LIMIT) for _ in range(rng.randint(*PROMPT_LENGTHS))]
            output = min(max(int(rng.lognormvariate(mu, OUTPUT_SIGMA)), 1), OUTPUT_MAX_TOKENS)
            requests.append((now, model, prompt, output))
            now += rng.expovariate(rate)
    return sorted(requests, key=lambda request: request[0])
