from __future__ import annotations

import json
import random

import pytest

from aegaeon.config import CALIBRATION_BOUNDS
from aegaeon.scheduler.predictor import (
    PROFILE_FORMAT_VERSION,
    FitError,
    Predictor,
    Profile,
    ProfileStore,
    decode_features,
    fit_decode,
    fit_prefill,
    fit_profile,
    held_out_error,
    prefill_features,
)
from tests.scheduler.helpers import profile, spec

PREFILL_TRUE = (0.012, 3e-5, 2e-8)
DECODE_TRUE = (0.008, 2e-6, 4e-4)


def _prefill_time(lengths: list[int]) -> float:
    a, b, c = PREFILL_TRUE
    return a + b * sum(lengths) + c * sum(n * n for n in lengths)


def _decode_time(contexts: list[int]) -> float:
    a, b, c = DECODE_TRUE
    return a + b * sum(contexts) + c * len(contexts)


def _prefill_samples(rng: random.Random, count: int = 20) -> list[tuple[list[int], float]]:
    out = []
    for _ in range(count):
        lengths = [rng.randint(1, 2048) for _ in range(rng.randint(1, 3))]
        out.append((lengths, _prefill_time(lengths)))
    return out


def _decode_samples(rng: random.Random, count: int = 20) -> list[tuple[list[int], float]]:
    out = []
    for _ in range(count):
        contexts = [rng.randint(1, 4096) for _ in range(rng.randint(1, 32))]
        out.append((contexts, _decode_time(contexts)))
    return out


def test_fit_recovers_known_coefficients_from_noiseless_samples() -> None:
    rng = random.Random(0)
    assert fit_prefill(_prefill_samples(rng)) == pytest.approx(PREFILL_TRUE, rel=1e-6)
    assert fit_decode(_decode_samples(rng)) == pytest.approx(DECODE_TRUE, rel=1e-6)


def test_fitted_profile_predicts_unseen_points() -> None:
    rng = random.Random(1)
    p = fit_profile("s", "float32", "cpu", _prefill_samples(rng), _decode_samples(rng), switch_s=0.25)
    assert p.switch_s == 0.25
    for lengths in ([3000], [100, 5000], [1]):
        assert p.predict_prefill(lengths) == pytest.approx(_prefill_time(lengths), rel=1e-6)
    for contexts in ([8000] * 64, [1], list(range(1, 100))):
        assert p.predict_decode(contexts) == pytest.approx(_decode_time(contexts), rel=1e-6)


def test_fit_is_close_under_noise() -> None:
    rng = random.Random(2)
    noisy = [(c, t * rng.uniform(0.98, 1.02)) for c, t in _decode_samples(rng, 200)]
    p = Profile("s", "f", "d", PREFILL_TRUE, fit_decode(noisy), 0.0)
    assert p.predict_decode([1000] * 16) == pytest.approx(_decode_time([1000] * 16), rel=0.03)


def test_too_few_samples_refused() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        fit_decode([([1], 0.1), ([2], 0.2)])


def test_predictions_never_negative_and_zero_for_empty_batches() -> None:
    p = profile(prefill=(-1.0, 1e-6, 0.0), decode=(-1.0, 0.0, 0.0))
    assert p.predict_prefill([10]) == 0.0
    assert p.predict_decode([10, 20]) == 0.0
    q = profile()
    assert q.predict_prefill([]) == 0.0 and q.predict_decode([]) == 0.0


def test_store_json_round_trip(tmp_path) -> None:
    a = profile("shape-a", switch_s=0.3)
    b = Profile("shape-b", "bfloat16", "cuda:H100", (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), 1.5)
    path = tmp_path / "sub" / "profiles.json"
    ProfileStore([a, b]).save(path)
    raw = json.loads(path.read_text())
    assert raw["version"] == PROFILE_FORMAT_VERSION and len(raw["profiles"]) == 2
    loaded = ProfileStore.load(path)
    assert len(loaded) == 2
    assert loaded.get("shape-a", "float32", "cpu") == a
    assert loaded.get("shape-b", "bfloat16", "cuda:H100") == b
    assert loaded.get("shape-b", "float32", "cuda:H100") is None  # dtype is part of the key
    assert [p.shape_key for p in loaded] == ["shape-a", "shape-b"]


def test_store_missing_file_is_empty_and_bad_version_refused(tmp_path) -> None:
    assert len(ProfileStore.load(tmp_path / "none.json")) == 0
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"version": 999, "profiles": []}))
    with pytest.raises(ValueError, match="version"):
        ProfileStore.load(path)


def test_store_add_replaces_same_key() -> None:
    store = ProfileStore([profile(switch_s=1.0)])
    store.add(profile(switch_s=2.0))
    assert len(store) == 1 and store.get("shape", "float32", "cpu").switch_s == 2.0


def test_predictor_maps_models_to_their_shape_profiles() -> None:
    store = ProfileStore([profile("shape-a", switch_s=0.1), profile("shape-b", switch_s=0.2)])
    pred = Predictor.for_models([spec("a"), spec("b")], store, "float32", "cpu")
    assert pred.switch_s("a") == 0.1 and pred.switch_s("b") == 0.2
    assert pred.decode_s("a", [100]) == pytest.approx(0.01 + 1e-3 + 1e-3)
    with pytest.raises(KeyError, match="c \\(shape-c"):
        Predictor.for_models([spec("a"), spec("c")], store, "float32", "cpu")
    with pytest.raises(KeyError, match="zzz"):
        pred.prefill_s("zzz", [1])


def test_held_out_error_of_exact_samples_is_nil() -> None:
    samples = _decode_samples(random.Random(3), 30)
    error = held_out_error(samples, decode_features, folds=5)
    assert error.points == 30
    assert error.r2 == pytest.approx(1.0) and error.mean_relative_error == pytest.approx(0.0, abs=1e-9)


def test_held_out_error_measures_the_noise_it_cannot_fit() -> None:
    rng = random.Random(4)
    # Every time off by 10% either way: no fit can predict a held-out point closer than that.
    noisy = [(c, t * rng.choice((0.9, 1.1))) for c, t in _decode_samples(rng, 60)]
    error = held_out_error(noisy, decode_features, folds=5)
    assert 0.07 < error.mean_relative_error < 0.15
    assert error.r2 < 0.999


def test_held_out_error_of_a_wrong_formula_is_large() -> None:
    # Prefill that grows with the cube of the prompt: the quadratic formula misses held-out points.
    samples = [([n], 1e-3 + 1e-9 * n**3) for n in range(16, 2048, 64)]
    assert held_out_error(samples, prefill_features).mean_relative_error > 0.15


def test_held_out_error_needs_enough_samples_to_fit_without_a_fold() -> None:
    samples = _prefill_samples(random.Random(5), 5)
    assert held_out_error(samples[:4], prefill_features, folds=2) is None  # 2 left to fit 3 coefficients
    assert held_out_error(samples, prefill_features, folds=5).points == 5


def test_the_fit_weighs_short_steps_as_much_as_long_ones() -> None:
    # The longest sample is 20% slow (a stray measurement): in absolute terms it dwarfs the short ones,
    # but the fit keeps them within a few percent.
    samples = [([n], _prefill_time([n])) for n in (4, 8, 16, 32, 64, 128, 256, 512, 1024)]
    samples.append(([2048], _prefill_time([2048]) * 1.2))
    coeffs = fit_prefill(samples)
    p = Profile("s", "f", "d", coeffs, DECODE_TRUE, 0.0)
    for n in (4, 16, 64):
        assert p.predict_prefill([n]) == pytest.approx(_prefill_time([n]), rel=0.03)


def test_fit_profile_stores_held_out_errors_and_they_round_trip(tmp_path) -> None:
    rng = random.Random(6)
    p = fit_profile("s", "float32", "cpu", _prefill_samples(rng), _decode_samples(rng), 0.1, folds=4)
    assert p.prefill_error.points == 20 and p.decode_error.points == 20
    path = tmp_path / "p.json"
    ProfileStore([p]).save(path)
    assert ProfileStore.load(path).get("s", "float32", "cpu") == p
    assert "R² 1.000" in p.describe_errors()


def test_a_profile_file_without_held_out_errors_still_loads(tmp_path) -> None:
    # As written before the held-out error was measured (and as the bundled derived profiles are).
    old = {"shape_key": "s", "dtype": "float32", "device": "cpu", "prefill": [0.01, 1e-4, 0.0]}
    old |= {"decode": [0.01, 1e-5, 1e-3], "switch_s": 0.5}
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"version": 1, "profiles": [old]}))
    loaded = ProfileStore.load(path).get("s", "float32", "cpu")
    assert loaded == profile("s") and loaded.prefill_error is None
    assert "not measured" in loaded.describe_errors() and "aegaeon profile" in loaded.describe_errors()


def test_fit_error_reads_as_a_user_would_want() -> None:
    text = str(FitError(r2=0.9876, mean_relative_error=0.0432, points=36))
    assert text == "R² 0.988, mean relative error 4.3% (36 points)"


def test_non_positive_times_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        fit_decode([([1], 0.1), ([2], 0.0), ([3], 0.3)])


def test_live_steps_calibrate_a_model_s_predictions_within_bounds() -> None:
    store = ProfileStore([profile("shape-a"), profile("shape-b")])
    pred = Predictor.for_models([spec("a"), spec("b")], store, "float32", "cpu")
    profiled_decode, profiled_prefill = pred.decode_s("a", [100]), pred.prefill_s("a", [64])
    # Live decode steps of model a take 1.5x what its profile says (the call into the instance
    # process, a shared machine): its decode predictions follow, nothing else moves.
    for _ in range(200):
        pred.observe_decode("a", [100], 1.5 * profiled_decode)
    assert pred.decode_s("a", [100]) == pytest.approx(1.5 * profiled_decode, rel=1e-3)
    profile_a = store.get("shape-a", "float32", "cpu")
    assert pred.decode_s("a", [400]) == pytest.approx(1.5 * profile_a.predict_decode([400]), rel=1e-3)
    assert pred.prefill_s("a", [64]) == profiled_prefill
    assert pred.decode_s("b", [100]) == profiled_decode
    # One outlier step moves it only a little; a profile off beyond the bounds is capped there.
    pred.observe_decode("a", [100], 100 * profiled_decode)
    assert pred.decode_s("a", [100]) < 2 * profiled_decode
    for _ in range(500):
        pred.observe_prefill("a", [64], 1000 * profiled_prefill)
    assert pred.prefill_s("a", [64]) == pytest.approx(CALIBRATION_BOUNDS[1] * profiled_prefill)
