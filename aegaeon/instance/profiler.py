"""Measure a model's prefill and decode latency on this device, for the scheduler's predictor.

The profile is what `aegaeon.scheduler.predictor` fits, over a grid that spans what the model serves
(`ProfileGrid` sets its density): prefill of one prompt at lengths up to max_model_len, decode steps
at batch sizes up to max_num_seqs and context lengths up to max_model_len (the pairs whose KV fits
the engine's KV blocks), and the switch time, measured as the copy of the model's bytes from the
host cache (what a switch costs beyond a pointer change). Each point is measured several times and
its outliers dropped; the fit's held-out error over the points is stored with it.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from aegaeon.config import (
    BLOCK_SIZE,
    PROFILE_MIN_CONTEXT_TOKENS,
    PROFILE_MIN_PROMPT_TOKENS,
    PROFILE_OUTLIER_MADS,
    ProfileGrid,
)
from aegaeon.engine.engine import LLMEngine
from aegaeon.engine.residency import ServedModel
from aegaeon.engine.sampling_params import SamplingParams
from aegaeon.scheduler.predictor import NUM_COEFFS, Profile, Sample, fit_profile

SWITCH_REPEATS = 3
PROFILE_SEED = 0
# The MAD of normally distributed times is this fraction of their standard deviation.
MAD_TO_STDEV = 1.4826
# Decode steps run after a batch's prefill before the timed ones: the first pays one-off costs.
DECODE_WARMUP_STEPS = 1
DEFAULT_GRID = ProfileGrid()


def device_name(device: torch.device) -> str:
    """How a device is named in profile keys: "cpu", or the GPU's model name."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def geometric_points(low: int, high: int, count: int) -> list[int]:
    """Up to `count` distinct integers from `low` to `high` (both included), spaced geometrically."""
    if high <= low or count < 2:
        return [max(low, high)] if count >= 1 else []
    ratio = (high / low) ** (1 / (count - 1))
    return sorted({min(high, round(low * ratio**i)) for i in range(count)} | {high})


def trimmed_time(times: Sequence[float], max_mads: float = PROFILE_OUTLIER_MADS) -> float:
    """The mean of `times` without those more than `max_mads` scaled MADs from their median."""
    median = statistics.median(times)
    mad = statistics.median(abs(t - median) for t in times) * MAD_TO_STDEV
    if mad == 0:  # at least half the times are equal: they are the time
        return median
    kept = [t for t in times if abs(t - median) <= max_mads * mad]
    return statistics.fmean(kept)


@dataclass(frozen=True)
class ProfilePlan:
    """The points one model is measured at on one engine."""

    prompt_lengths: list[int]
    decode_points: list[tuple[int, int]]  # (batch size, prompt length of each member)


def plan_profile(
    max_model_len: int, max_num_seqs: int, kv_blocks: int, grid: ProfileGrid = DEFAULT_GRID
) -> ProfilePlan:
    """The grid for a model: prompts and decode batches that fit its context and `kv_blocks`.

    A decode point's sequences grow past their prompt by the warm-up and timed steps; at a batch size
    whose longest contexts do not fit the KV blocks, the longest context that does stands for them.
    """
    longest_prompt = min(max_model_len - 1, kv_blocks * BLOCK_SIZE - 1)
    prompt_lengths = geometric_points(
        min(PROFILE_MIN_PROMPT_TOKENS, longest_prompt), longest_prompt, grid.prefill_points
    )
    grown = _decode_tokens(grid)
    longest_context = max_model_len - grown
    decode_points: list[tuple[int, int]] = []
    if longest_context >= 1:
        contexts = geometric_points(
            min(PROFILE_MIN_CONTEXT_TOKENS, longest_context), longest_context, grid.context_points
        )
        for batch in geometric_points(1, max_num_seqs, grid.batch_points):
            # One block per sequence spare: the engine reserves the next step's slot ahead.
            fitting = (kv_blocks // batch - 1) * BLOCK_SIZE - grown
            if fitting < 1:
                continue
            chosen = sorted({min(context, fitting) for context in contexts})
            decode_points.extend((batch, context) for context in chosen)
    return ProfilePlan(prompt_lengths, decode_points)


def _decode_tokens(grid: ProfileGrid) -> int:
    """Tokens a decode point's sequences generate: the prefill's, the warm-up steps', the timed ones'."""
    return 1 + DECODE_WARMUP_STEPS + grid.repeats


def _prompt(rng: random.Random, served: ServedModel, length: int) -> list[int]:
    return [rng.randrange(served.arch.vocab_size) for _ in range(length)]


def _timed_step(engine: LLMEngine) -> float:
    _sync(engine.device)
    start = time.perf_counter()
    engine.step()
    _sync(engine.device)
    return time.perf_counter() - start


def _timed_prefill(engine: LLMEngine, request_id: str) -> float:
    """Seconds from the first step to the one that gives `request_id` its first token (a prompt longer
    than max_num_batched_tokens takes several)."""
    _sync(engine.device)
    start = time.perf_counter()
    while not any(output.request_id == request_id for output in engine.step()):
        pass
    _sync(engine.device)
    return time.perf_counter() - start


def _prefill_all(engine: LLMEngine, request_ids: list[str]) -> None:
    """Step until every request has its first token."""
    waiting = set(request_ids)
    while waiting:
        waiting -= {output.request_id for output in engine.step()}


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


def measure_prefill(
    engine: LLMEngine, served: ServedModel, plan: ProfilePlan, grid: ProfileGrid, rng: random.Random, bar
) -> list[Sample]:
    """One sample per prompt length: the trimmed time of `grid.repeats` prefills.

    The lengths are measured in rounds, each length once a round (a warm-up round first), so a burst
    of load from another process slows one measurement of many lengths, which trimming drops, rather
    than every measurement of one.
    """
    times: list[list[float]] = [[] for _ in plan.prompt_lengths]
    params = SamplingParams(max_tokens=1)
    for round_index in range(grid.repeats + 1):
        for length, measured in zip(plan.prompt_lengths, times, strict=True):
            engine.add_request("profile", _prompt(rng, served, length), params, served.name)
            seconds = _timed_prefill(engine, "profile")
            if round_index:
                measured.append(seconds)
        bar.update()
    return [([length], trimmed_time(t)) for length, t in zip(plan.prompt_lengths, times, strict=True)]


def measure_decode(
    engine: LLMEngine, served: ServedModel, plan: ProfilePlan, grid: ProfileGrid, rng: random.Random, bar
) -> list[Sample]:
    """One sample per (batch, prompt length): the trimmed time of `grid.repeats` consecutive steps.

    A step's context is what the scheduler predicts it by (prompt + tokens generated before it); the
    sample takes the middle timed step's.
    """
    samples = []
    params = SamplingParams(max_tokens=_decode_tokens(grid), ignore_eos=True)
    for batch, length in plan.decode_points:
        ids = [f"profile-{i}" for i in range(batch)]
        for request_id in ids:
            engine.add_request(request_id, _prompt(rng, served, length), params, served.name)
        _prefill_all(engine, ids)
        for _ in range(DECODE_WARMUP_STEPS):
            engine.step()
        times = [_timed_step(engine) for _ in range(grid.repeats)]
        context = length + 1 + DECODE_WARMUP_STEPS + grid.repeats // 2
        samples.append(([context] * batch, trimmed_time(times)))
        for request_id in ids:
            engine.abort_request(request_id)
        bar.update()
    return samples


def profile_model(
    engine: LLMEngine, name: str, progress: bool = True, grid: ProfileGrid = DEFAULT_GRID
) -> Profile:
    """Measure `name` on the engine's device (the engine must be idle) and fit its profile."""
    served = engine.models[name]
    engine.switch_to(name)
    plan = plan_profile(
        served.max_model_len, engine.config.max_num_seqs, served.batcher.allocator.num_free, grid
    )
    if min(len(plan.prompt_lengths), len(plan.decode_points)) < NUM_COEFFS:
        raise ValueError(
            f"cannot profile {name}: a max_model_len of {served.max_model_len} and "
            f"{served.batcher.allocator.num_free} free KV blocks leave fewer than {NUM_COEFFS} prompt "
            "lengths or decode points to fit"
        )
    rng = random.Random(PROFILE_SEED)
    total = grid.repeats + 1 + len(plan.decode_points)
    bar = tqdm(total=total, desc=f"profiling {name}", disable=not progress or None, leave=False)
    with bar:
        prefill = measure_prefill(engine, served, plan, grid, rng, bar)
        decode = measure_decode(engine, served, plan, grid, rng, bar)
    return fit_profile(
        served.shape_key,
        str(engine.dtype).removeprefix("torch."),
        device_name(engine.device),
        prefill,
        decode,
        measure_switch_s(engine, served),
        grid.folds,
    )
