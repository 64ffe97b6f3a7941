"""Measure a model's prefill and decode latency on this device, for the scheduler's predictor.

The profile is what `aegaeon.scheduler.predictor` fits: prefill of one prompt at several lengths,
decode steps at several batch sizes and context lengths, and the switch time, measured as the copy
of the model's bytes from the host cache (what a switch costs beyond a pointer change).
"""

from __future__ import annotations

import random
import statistics
import time

import torch
from tqdm import tqdm

from aegaeon.engine.engine import LLMEngine
from aegaeon.engine.residency import ServedModel
from aegaeon.engine.sampling_params import SamplingParams
from aegaeon.scheduler.predictor import Profile, fit_profile

PREFILL_LENGTHS = (8, 64, 256)
DECODE_BATCHES = (1, 4, 16)
DECODE_CONTEXTS = (16, 128)
STEPS_PER_SAMPLE = 2
SWITCH_REPEATS = 3
PROFILE_SEED = 0


def device_name(device: torch.device) -> str:
    """How a device is named in profile keys: "cpu", or the GPU's model name."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_step(engine: LLMEngine) -> float:
    _sync(engine.device)
    start = time.perf_counter()
    engine.step()
    _sync(engine.device)
    return time.perf_counter() - start


def _prompt(rng: random.Random, served: ServedModel, length: int) -> list[int]:
    return [rng.randrange(served.arch.vocab_size) for _ in range(length)]


def measure_switch_s(engine: LLMEngine, served: ServedModel) -> float:
    """Median time to copy the model's bytes from the host cache to this device."""
    cached = engine.residency.host_copy(served.name)
    source = engine.residency.model_cache.buffer[cached.offset : cached.offset + cached.nbytes]
    target = torch.empty(cached.nbytes, dtype=torch.uint8, device=engine.device)
    times = []
    for _ in range(SWITCH_REPEATS + 1):
        _sync(engine.device)
        start = time.perf_counter()
        target.copy_(source, non_blocking=True)
        _sync(engine.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def profile_model(engine: LLMEngine, name: str, progress: bool = True) -> Profile:
    """Measure `name` on the engine's device (the engine must be idle) and fit its profile."""
    served = engine.models[name]
    engine.switch_to(name)
    rng = random.Random(PROFILE_SEED)
    limit = served.max_model_len - STEPS_PER_SAMPLE - 1
    lengths = [length for length in PREFILL_LENGTHS if length <= limit] or [1, 2, 3]
    batches = [b for b in DECODE_BATCHES if b <= engine.config.max_num_seqs]
    contexts = sorted({min(c, limit) for c in DECODE_CONTEXTS})
    total = len(lengths) * STEPS_PER_SAMPLE + len(batches) * len(contexts)
    bar = tqdm(total=total, desc=f"profiling {name}", disable=not progress or None, leave=False)
    prefill_samples, decode_samples = [], []
    with bar:
        for length in lengths:
            for repeat in range(STEPS_PER_SAMPLE + 1):  # the first run of each length warms up
                prompt = _prompt(rng, served, length)
                engine.add_request("profile", prompt, SamplingParams(max_tokens=1), name)
                seconds = _timed_step(engine)
                if repeat:
                    prefill_samples.append(([length], seconds))
                    bar.update()
        for batch in batches:
            for context in contexts:
                ids = [f"profile-{i}" for i in range(batch)]
                params = SamplingParams(max_tokens=STEPS_PER_SAMPLE + 2, ignore_eos=True)
                for request_id in ids:
                    engine.add_request(request_id, _prompt(rng, served, context), params, name)
                engine.step()  # the prefill
                engine.step()  # the first decode step warms up
                for step in range(STEPS_PER_SAMPLE):
                    seconds = _timed_step(engine)
                    decode_samples.append(([context + 2 + step] * batch, seconds))
                for request_id in ids:
                    engine.abort_request(request_id)
                bar.update()
    return fit_profile(
        served.shape_key,
        str(engine.dtype).removeprefix("torch."),
        device_name(engine.device),
        prefill_samples,
        decode_samples,
        measure_switch_s(engine, served),
    )
