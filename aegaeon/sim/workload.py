"""Synthetic workloads: arrivals per model (Poisson or bursty Gamma), Zipf popularity, lognormal lengths.

Defaults follow the paper's setup: 0.1 requests/s per model, prompt and output lengths lognormal with
means of about 700 and 290 tokens (the ShareGPT statistics the paper used).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

DEFAULT_RATE_PER_MODEL = 0.1
DEFAULT_DURATION_S = 600.0
DEFAULT_INPUT_MEAN = 700
DEFAULT_OUTPUT_MEAN = 290
# Spread of the lognormals (the sigma of log-length): ShareGPT lengths span about two decades.
DEFAULT_LENGTH_SIGMA = 0.8
# Caps keep prompt + output within a 4k-context model (Yi-1.5-9B, Llama-2-13B).
DEFAULT_MAX_INPUT = 2048
DEFAULT_MAX_OUTPUT = 2048
ARRIVAL_PROCESSES = ("poisson", "gamma")


@dataclass(frozen=True, slots=True)
class Arrival:
    """One request of a workload: when it arrives, for which model, and its lengths in tokens."""

    arrival_s: float
    model: str
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class LengthConfig:
    """Lognormal prompt and output lengths, given by their means (before capping) and log-spread."""

    input_mean: float = DEFAULT_INPUT_MEAN
    output_mean: float = DEFAULT_OUTPUT_MEAN
    sigma: float = DEFAULT_LENGTH_SIGMA
    max_input: int = DEFAULT_MAX_INPUT
    max_output: int = DEFAULT_MAX_OUTPUT

    def __post_init__(self) -> None:
        if self.input_mean < 1 or self.output_mean < 1:
            raise ValueError("mean lengths must be >= 1 token")
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")
        if self.max_input < 1 or self.max_output < 1:
            raise ValueError("length caps must be >= 1 token")


@dataclass(frozen=True)
class WorkloadConfig:
    """Arrivals over `duration_s` for `num_models` models named `{prefix}{index}`.

    The mean total rate is `num_models * rate_per_model`; `zipf_s` > 0 splits it over the models by
    Zipf popularity (model i gets a share proportional to 1 / (i + 1)^s) instead of evenly. `cv` is the
    coefficient of variation of the Gamma inter-arrival times (1: Poisson; above 1: bursty).
    """

    num_models: int
    rate_per_model: float = DEFAULT_RATE_PER_MODEL
    duration_s: float = DEFAULT_DURATION_S
    arrival: str = "poisson"
    cv: float = 1.0
    zipf_s: float = 0.0
    lengths: LengthConfig = field(default_factory=LengthConfig)
    seed: int = 0
    prefix: str = "m"

    def __post_init__(self) -> None:
        if self.num_models < 1:
            raise ValueError(f"num_models must be >= 1, got {self.num_models}")
        if self.rate_per_model <= 0:
            raise ValueError(f"rate_per_model must be positive, got {self.rate_per_model}")
        if self.duration_s <= 0:
            raise ValueError(f"duration_s must be positive, got {self.duration_s}")
        if self.arrival not in ARRIVAL_PROCESSES:
            raise ValueError(f"arrival must be one of {ARRIVAL_PROCESSES}, got {self.arrival!r}")
        if self.cv <= 0:
            raise ValueError(f"cv must be positive, got {self.cv}")
        if self.zipf_s < 0:
            raise ValueError(f"zipf_s must be >= 0, got {self.zipf_s}")

    def model_names(self) -> list[str]:
        width = len(str(self.num_models - 1))
        return [f"{self.prefix}{index:0{width}d}" for index in range(self.num_models)]

    def model_rates(self) -> list[float]:
        """Mean requests/s of each model, in model order."""
        total = self.num_models * self.rate_per_model
        weights = np.array([1.0 / (i + 1) ** self.zipf_s for i in range(self.num_models)])
        return list(total * weights / weights.sum())


def lognormal_mu(mean: float, sigma: float) -> float:
    """The mu of a lognormal whose mean is `mean` with log-spread `sigma`."""
    return math.log(mean) - sigma * sigma / 2


def sample_lengths(
    rng: np.random.Generator, count: int, config: LengthConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Prompt and output lengths of `count` requests, each at least 1 token and within the caps."""
    inputs = rng.lognormal(lognormal_mu(config.input_mean, config.sigma), config.sigma, count)
    outputs = rng.lognormal(lognormal_mu(config.output_mean, config.sigma), config.sigma, count)
    inputs = np.clip(np.rint(inputs), 1, config.max_input).astype(int)
    outputs = np.clip(np.rint(outputs), 1, config.max_output).astype(int)
    return inputs, outputs


def arrival_times(
    rng: np.random.Generator, rate: float, duration_s: float, process: str, cv: float
) -> np.ndarray:
    """Arrival times in [0, duration_s) of one model: a renewal process with mean rate `rate`."""
    # Draw in chunks until past the end: the expected count plus a margin covers it almost always.
    expected = rate * duration_s
    chunk = max(int(expected + 6 * math.sqrt(expected + 1) * max(cv, 1.0)) + 8, 16)
    times: list[np.ndarray] = []
    start = 0.0
    while True:
        if process == "poisson":
            gaps = rng.exponential(1.0 / rate, chunk)
        else:
            # Gamma with shape k = 1/cv^2 and mean 1/rate has coefficient of variation cv.
            shape = 1.0 / (cv * cv)
            gaps = rng.gamma(shape, 1.0 / (rate * shape), chunk)
        stamps = start + np.cumsum(gaps)
        times.append(stamps[stamps < duration_s])
        if stamps[-1] >= duration_s:
            return np.concatenate(times)
        start = float(stamps[-1])


def generate_workload(config: WorkloadConfig) -> list[Arrival]:
    """The arrivals of a synthetic workload, sorted by time (deterministic for a given seed)."""
    rng = np.random.default_rng(config.seed)
    arrivals: list[Arrival] = []
    for model, rate in zip(config.model_names(), config.model_rates(), strict=True):
        times = arrival_times(rng, rate, config.duration_s, config.arrival, config.cv)
        inputs, outputs = sample_lengths(rng, len(times), config.lengths)
        arrivals.extend(
            Arrival(float(t), model, int(i), int(o)) for t, i, o in zip(times, inputs, outputs, strict=True)
        )
    arrivals.sort(key=lambda a: (a.arrival_s, a.model))
    return arrivals


def workload_models(arrivals: Sequence[Arrival]) -> list[str]:
    """The models of a workload in order of their first request."""
    return list(dict.fromkeys(a.model for a in arrivals))
