from __future__ import annotations

import numpy as np
import pytest

from aegaeon.sim.workload import LengthConfig, WorkloadConfig, generate_workload, workload_models


def _gaps(arrivals, model: str) -> np.ndarray:
    return np.diff([a.arrival_s for a in arrivals if a.model == model])


def test_poisson_rates_and_length_means() -> None:
    config = WorkloadConfig(num_models=10, rate_per_model=0.5, duration_s=2000, seed=3)
    arrivals = generate_workload(config)
    assert len(arrivals) == pytest.approx(10 * 0.5 * 2000, rel=0.05)
    assert [a.arrival_s for a in arrivals] == sorted(a.arrival_s for a in arrivals)
    assert all(0 <= a.arrival_s < 2000 for a in arrivals)
    inputs = np.array([a.input_tokens for a in arrivals])
    outputs = np.array([a.output_tokens for a in arrivals])
    # Means of about 700 and 290 tokens (the caps trim a little of the lognormal's tail).
    assert inputs.mean() == pytest.approx(700, rel=0.07)
    assert outputs.mean() == pytest.approx(290, rel=0.07)
    assert inputs.min() >= 1 and inputs.max() <= LengthConfig().max_input
    gaps = _gaps(arrivals, "m0")
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.15)  # exponential gaps


def test_same_seed_same_workload_other_seed_other_workload() -> None:
    config = WorkloadConfig(num_models=3, duration_s=200, seed=7)
    assert generate_workload(config) == generate_workload(config)
    assert generate_workload(config) != generate_workload(
        WorkloadConfig(num_models=3, duration_s=200, seed=8)
    )


def test_gamma_arrivals_have_the_asked_burstiness() -> None:
    config = WorkloadConfig(
        num_models=1, rate_per_model=2.0, duration_s=5000, arrival="gamma", cv=3.0, seed=1
    )
    arrivals = generate_workload(config)
    gaps = _gaps(arrivals, "m0")
    assert 1 / gaps.mean() == pytest.approx(2.0, rel=0.15)
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.2)


def test_zipf_popularity_skews_the_rates_and_keeps_the_total() -> None:
    config = WorkloadConfig(num_models=20, rate_per_model=0.2, duration_s=3000, zipf_s=1.2, seed=2)
    rates = config.model_rates()
    assert sum(rates) == pytest.approx(20 * 0.2)
    assert rates[0] / rates[1] == pytest.approx(2**1.2)
    arrivals = generate_workload(config)
    counts = {m: sum(1 for a in arrivals if a.model == m) for m in config.model_names()}
    assert counts[config.model_names()[0]] / 3000 == pytest.approx(rates[0], rel=0.1)
    assert workload_models(arrivals)[0] == config.model_names()[0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_models": 0}, "num_models"),
        ({"num_models": 1, "rate_per_model": 0}, "rate_per_model"),
        ({"num_models": 1, "arrival": "uniform"}, "arrival"),
        ({"num_models": 1, "cv": 0}, "cv"),
    ],
)
def test_bad_workload_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WorkloadConfig(**kwargs)
