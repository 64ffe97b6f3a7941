"""Execution-time predictor: per-shape latency profiles, their least-squares fit, and their JSON file.

    T_prefill = a + b·Σlen + c·Σlen²       (Σlen² = sum over the batch of each prompt length squared)
    T_decode  = a + b·Σcontext + c·batch

Both are fitted by least squares on relative residuals (each sample weighted by 1/its time), so a
16-token prompt's prediction is as close in percent as a 2k-token one's. A profile is keyed by
(shape_key, dtype, device) and also holds the measured switch time and each fit's held-out error
(cross-validated over the measured points; absent in profiles written before it was measured). A set
of profiles is stored as ONE JSON file: {"version": 1, "profiles": [profile.to_dict(), ...]}.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aegaeon.config import (
    CALIBRATION_BOUNDS,
    CALIBRATION_WEIGHT,
    DEFAULT_PROFILE_FOLDS,
    PROFILE_POOR_FIT_ERROR,
)
from aegaeon.scheduler.models import ModelSpec

PROFILE_FORMAT_VERSION = 1
# The two kinds of step a profile predicts (live calibration keeps a factor per model and kind).
PREFILL_STEP, DECODE_STEP = "prefill", "decode"
# Each formula has three coefficients (a, b, c); fewer samples cannot determine them.
NUM_COEFFS = 3

Coeffs = tuple[float, float, float]
# One measurement: the lengths in the batch (prompt lengths or context lengths) and the seconds it took.
Sample = tuple[Sequence[int], float]


def prefill_features(lengths: Sequence[int]) -> tuple[float, float, float]:
    return (1.0, float(sum(lengths)), float(sum(n * n for n in lengths)))


def decode_features(context_lens: Sequence[int]) -> tuple[float, float, float]:
    return (1.0, float(sum(context_lens)), float(len(context_lens)))


Features = Callable[[Sequence[int]], tuple[float, float, float]]


def _fit(samples: Iterable[Sample], features: Features) -> Coeffs:
    rows, times = [], []
    for lengths, seconds in samples:
        rows.append(features(lengths))
        times.append(float(seconds))
    if len(rows) < NUM_COEFFS:
        raise ValueError(f"need at least {NUM_COEFFS} samples to fit, got {len(rows)}")
    if min(times) <= 0:
        raise ValueError(f"sample times must be positive, got {min(times)}")
    # Relative residuals: each row divided by its time. Unweighted, the longest steps would decide the
    # fit and the short ones (most of a workload's) could be off by half.
    weights = 1.0 / np.array(times)
    a, b, c = _nonnegative_lstsq(np.array(rows) * weights[:, None], np.ones(len(times)))
    return (a, b, c)


def _nonnegative_lstsq(matrix: np.ndarray, target: np.ndarray) -> Coeffs:
    """The least-squares coefficients that are all >= 0.

    Every term of the formulas is a cost (a fixed one, per token, per sequence): a negative one fits
    noise, and makes long batches predict less time than short ones (even zero). With three
    coefficients, the best of the least-squares fits over every subset of them that comes out
    non-negative is the exact constrained optimum. Rank-deficient samples (e.g. every decode sample
    at one batch size) get the minimum-norm solution of their subset.
    """
    best, best_residual = np.zeros(NUM_COEFFS), float(np.sum(target**2))
    for subset in itertools.product((False, True), repeat=NUM_COEFFS):
        columns = [i for i, used in enumerate(subset) if used]
        if not columns:
            continue
        solution, *_ = np.linalg.lstsq(matrix[:, columns], target, rcond=None)
        if (solution < 0).any():
            continue
        coeffs = np.zeros(NUM_COEFFS)
        coeffs[columns] = solution
        residual = float(np.sum((matrix @ coeffs - target) ** 2))
        if residual < best_residual:
            best, best_residual = coeffs, residual
    return (float(best[0]), float(best[1]), float(best[2]))


def fit_prefill(samples: Iterable[Sample]) -> Coeffs:
    """Least-squares (a, b, c) of T_prefill from (prompt lengths, seconds) samples."""
    return _fit(samples, prefill_features)


def fit_decode(samples: Iterable[Sample]) -> Coeffs:
    """Least-squares (a, b, c) of T_decode from (context lengths, seconds) samples."""
    return _fit(samples, decode_features)


def _evaluate(coeffs: Coeffs, features: tuple[float, float, float]) -> float:
    # A fitted line can dip below zero outside the profiled range; time cannot.
    return max(sum(k * x for k, x in zip(coeffs, features, strict=True)), 0.0)


@dataclass(frozen=True)
class FitError:
    """How well a fit predicts points it was not fitted on (each measured point held out in turn)."""

    r2: float  # coefficient of determination of the held-out predictions
    mean_relative_error: float  # mean of |predicted - measured| / measured
    points: int  # measured points, each predicted once

    def to_dict(self) -> dict:
        return {"r2": self.r2, "mean_relative_error": self.mean_relative_error, "points": self.points}

    @classmethod
    def from_dict(cls, d: Mapping) -> FitError:
        return cls(float(d["r2"]), float(d["mean_relative_error"]), int(d["points"]))

    def __str__(self) -> str:
        return f"R² {self.r2:.3f}, mean relative error {self.mean_relative_error:.1%} ({self.points} points)"


def held_out_error(
    samples: Sequence[Sample], features: Features, folds: int = DEFAULT_PROFILE_FOLDS
) -> FitError | None:
    """K-fold cross-validation: sample i is predicted by the fit of the samples outside fold i mod
    `folds`. None when a fold's complement is too small to fit (fewer than NUM_COEFFS + 1 samples)."""
    samples = list(samples)
    folds = min(folds, len(samples))
    if folds < 2 or len(samples) - math.ceil(len(samples) / folds) < NUM_COEFFS:
        return None
    predicted = [0.0] * len(samples)
    for fold in range(folds):
        kept = [s for i, s in enumerate(samples) if i % folds != fold]
        coeffs = _fit(kept, features)
        for i in range(fold, len(samples), folds):
            predicted[i] = _evaluate(coeffs, features(samples[i][0]))
    measured = np.array([float(seconds) for _, seconds in samples])
    errors = np.array(predicted) - measured
    spread = float(np.sum((measured - measured.mean()) ** 2))
    # All points equal: R² is undefined; call it perfect if the predictions match them too.
    r2 = 1.0 - float(np.sum(errors**2)) / spread if spread > 0 else float(np.allclose(errors, 0))
    return FitError(r2, float(np.mean(np.abs(errors) / measured)), len(samples))


@dataclass(frozen=True)
class ProfileKey:
    shape_key: str
    dtype: str
    device: str


@dataclass(frozen=True)
class Profile:
    """Latency model of one architecture shape, in one dtype, on one device."""

    shape_key: str
    dtype: str
    device: str
    prefill: Coeffs
    decode: Coeffs
    # Measured seconds to switch this device to a model of this shape (weights host -> device).
    switch_s: float
    # Held-out error of each fit (None: not measured, e.g. a profile derived from public numbers or
    # written before aegaeon measured it).
    prefill_error: FitError | None = None
    decode_error: FitError | None = None

    @property
    def key(self) -> ProfileKey:
        return ProfileKey(self.shape_key, self.dtype, self.device)

    def predict_prefill(self, lengths: Sequence[int]) -> float:
        """Seconds to prefill prompts of these lengths in one batch (0 for none)."""
        return _evaluate(self.prefill, prefill_features(lengths)) if lengths else 0.0

    def predict_decode(self, context_lens: Sequence[int]) -> float:
        """Seconds of one decode step of a batch with these context lengths (0 for an empty batch)."""
        return _evaluate(self.decode, decode_features(context_lens)) if context_lens else 0.0

    def to_dict(self) -> dict:
        d = {
            "shape_key": self.shape_key,
            "dtype": self.dtype,
            "device": self.device,
            "prefill": list(self.prefill),
            "decode": list(self.decode),
            "switch_s": self.switch_s,
        }
        for name, error in (("prefill_error", self.prefill_error), ("decode_error", self.decode_error)):
            if error is not None:
                d[name] = error.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> Profile:
        errors = {
            name: FitError.from_dict(d[name]) if d.get(name) is not None else None
            for name in ("prefill_error", "decode_error")
        }
        return cls(
            shape_key=str(d["shape_key"]),
            dtype=str(d["dtype"]),
            device=str(d["device"]),
            prefill=_coeffs(d["prefill"]),
            decode=_coeffs(d["decode"]),
            switch_s=float(d["switch_s"]),
            **errors,
        )

    def describe_errors(self) -> str:
        """One line: each fit's held-out error, or that it was not measured."""
        if self.prefill_error is None or self.decode_error is None:
            return (
                "held-out error not measured (a profile from an older aegaeon, or derived): "
                "`aegaeon profile` measures it anew"
            )
        text = f"prefill {self.prefill_error}; decode {self.decode_error} (held out)"
        if self.poor_fit:
            text += (
                f" - above {PROFILE_POOR_FIT_ERROR:.0%}: the steps were noisy while profiling (another "
                "process on the machine?) or the formula misses this device; re-profile on a quiet machine"
            )
        return text

    @property
    def poor_fit(self) -> bool:
        """Whether either fit's held-out mean relative error is above PROFILE_POOR_FIT_ERROR."""
        errors = (self.prefill_error, self.decode_error)
        return any(e is not None and e.mean_relative_error > PROFILE_POOR_FIT_ERROR for e in errors)


def _coeffs(values: Sequence[float]) -> Coeffs:
    if len(values) != NUM_COEFFS:
        raise ValueError(f"expected {NUM_COEFFS} coefficients, got {len(values)}")
    return (float(values[0]), float(values[1]), float(values[2]))


def fit_profile(
    shape_key: str,
    dtype: str,
    device: str,
    prefill_samples: Iterable[Sample],
    decode_samples: Iterable[Sample],
    switch_s: float,
    folds: int = DEFAULT_PROFILE_FOLDS,
) -> Profile:
    """Fit both formulas from measurements (all of them), with each fit's held-out error over
    `folds` folds, and bundle them with the measured switch time."""
    prefill, decode = list(prefill_samples), list(decode_samples)
    return Profile(
        shape_key,
        dtype,
        device,
        fit_prefill(prefill),
        fit_decode(decode),
        float(switch_s),
        held_out_error(prefill, prefill_features, folds),
        held_out_error(decode, decode_features, folds),
    )


class ProfileStore:
    """A set of profiles keyed by (shape_key, dtype, device), saved to and loaded from one JSON file."""

    def __init__(self, profiles: Iterable[Profile] = ()) -> None:
        self._profiles: dict[ProfileKey, Profile] = {}
        for profile in profiles:
            self.add(profile)

    def add(self, profile: Profile) -> None:
        """Add or replace the profile of its key."""
        self._profiles[profile.key] = profile

    def get(self, shape_key: str, dtype: str, device: str) -> Profile | None:
        return self._profiles.get(ProfileKey(shape_key, dtype, device))

    def __contains__(self, key: ProfileKey) -> bool:
        return key in self._profiles

    def __len__(self) -> int:
        return len(self._profiles)

    def __iter__(self) -> Iterator[Profile]:
        return iter(self._profiles.values())

    def to_dict(self) -> dict:
        ordered = sorted(self._profiles.values(), key=lambda p: (p.shape_key, p.dtype, p.device))
        return {"version": PROFILE_FORMAT_VERSION, "profiles": [p.to_dict() for p in ordered]}

    @classmethod
    def from_dict(cls, d: Mapping) -> ProfileStore:
        version = d.get("version")
        if version != PROFILE_FORMAT_VERSION:
            raise ValueError(f"unsupported profile file version {version!r} (want {PROFILE_FORMAT_VERSION})")
        return cls(Profile.from_dict(p) for p in d["profiles"])

    def save(self, path: str | Path) -> None:
        """Write the whole set to `path` atomically (a reader never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=2)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | Path) -> ProfileStore:
        """Read a set saved by `save`; a missing file is an empty set (nothing profiled yet)."""
        path = Path(path)
        if not path.exists():
            return cls()
        return cls.from_dict(json.loads(path.read_text()))


class Predictor:
    """Predictions per model name on one device: each model maps to its shape's profile."""

    def __init__(self, profiles: Mapping[str, Profile]) -> None:
        self._profiles = dict(profiles)
        # (model, "prefill" | "decode") -> log of measured / profiled step time, from live steps.
        self._log_scale: dict[tuple[str, str], float] = {}
        self._observed: dict[tuple[str, str], int] = {}

    @classmethod
    def for_models(
        cls, specs: Iterable[ModelSpec], store: ProfileStore, dtype: str, device: str
    ) -> Predictor:
        """Look up each model's profile; raise KeyError naming every model whose shape is not profiled."""
        profiles, missing = {}, []
        for spec in specs:
            profile = store.get(spec.shape_key, dtype, device)
            if profile is None:
                missing.append(f"{spec.name} ({spec.shape_key}, {dtype}, {device})")
            else:
                profiles[spec.name] = profile
        if missing:
            raise KeyError(f"no profile for: {', '.join(missing)}")
        return cls(profiles)

    def add(self, model: str, profile: Profile) -> None:
        """Predict for one more model (one registered while serving)."""
        self._profiles[model] = profile

    def profile(self, model: str) -> Profile:
        try:
            return self._profiles[model]
        except KeyError:
            raise KeyError(f"no profile for model {model!r}") from None

    def prefill_s(self, model: str, lengths: Sequence[int]) -> float:
        return self.profile(model).predict_prefill(lengths) * self.scale(model, PREFILL_STEP)

    def decode_s(self, model: str, context_lens: Sequence[int]) -> float:
        return self.profile(model).predict_decode(context_lens) * self.scale(model, DECODE_STEP)

    def scale(self, model: str, kind: str) -> float:
        """The factor live steps of this kind showed the profile to be off by (1 until observed)."""
        return math.exp(self._log_scale.get((model, kind), 0.0))

    def observe_prefill(self, model: str, lengths: Sequence[int], measured_s: float) -> None:
        """Calibrate to a live prefill of these prompt lengths that took `measured_s`."""
        self._observe(model, PREFILL_STEP, self.profile(model).predict_prefill(lengths), measured_s)

    def observe_decode(self, model: str, context_lens: Sequence[int], measured_s: float) -> None:
        """Calibrate to a live decode step of these context lengths that took `measured_s`."""
        self._observe(model, DECODE_STEP, self.profile(model).predict_decode(context_lens), measured_s)

    def _observe(self, model: str, kind: str, profiled_s: float, measured_s: float) -> None:
        if profiled_s <= 0 or measured_s <= 0:
            return
        low, high = (math.log(bound) for bound in CALIBRATION_BOUNDS)
        key = (model, kind)
        seen = self._observed[key] = self._observed.get(key, 0) + 1
        # The plain mean of the first observations (prefills are few), then a moving average.
        weight = max(CALIBRATION_WEIGHT, 1.0 / seen)
        previous = self._log_scale.get(key, 0.0)
        moved = previous + weight * (math.log(measured_s / profiled_s) - previous)
        self._log_scale[key] = min(max(moved, low), high)

    def switch_s(self, model: str) -> float:
        """Seconds to switch this device to `model`."""
        return self.profile(model).switch_s
