from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from aegaeon.scheduler.models import ModelSpec
from aegaeon.scheduler.predictor import Profile, ProfileStore
from aegaeon.sim.models import (
    PAPER_KINDS,
    PAPER_MIX,
    ModelSet,
    assign_kinds,
    build_model_set,
    load_profiles,
    select_kinds,
)

H100 = "NVIDIA H100 80GB HBM3"


def test_paper_mix_maps_models_six_two_two() -> None:
    store = load_profiles(None)
    models = [f"m{i}" for i in range(80)]
    model_set = build_model_set(models, store, H100, PAPER_KINDS, PAPER_MIX)
    kinds = Counter(model_set.specs[m].shape_key for m in models)
    assert sorted(kinds.values()) == [16, 16, 48]
    # Interleaved: the first ten models already hold the 6:2:2 ratio.
    first = Counter(model_set.specs[m].shape_key for m in models[:10])
    assert sorted(first.values()) == [2, 2, 6]


def test_assign_kinds_rejects_a_bad_mix() -> None:
    kinds = select_kinds(load_profiles(None), H100, PAPER_KINDS)
    with pytest.raises(ValueError, match="3 model kinds"):
        assign_kinds(["a"], kinds, [1, 1])
    with pytest.raises(ValueError, match="positive sum"):
        assign_kinds(["a"], kinds, [0, 0, 0])


def test_a_profile_file_from_aegaeon_profile_is_accepted(tmp_path: Path) -> None:
    key = "llama-h256-l4-q4-kv2-d64-i512-v905"
    store = ProfileStore([Profile(key, "float32", "cpu", (0.001, 1e-5, 0.0), (0.002, 1e-7, 1e-4), 0.001)])
    path = tmp_path / "profiles.json"
    store.save(path)
    model_set = build_model_set(["x", "y"], load_profiles(path), "cpu")
    spec = model_set.specs["x"]
    assert spec.shape_key == key
    # float32 KV: 2 (K, V) * 4 layers * 2 KV heads * 64 dims * 4 bytes * 16 tokens per block.
    assert spec.kv_block_bytes == 2 * 4 * 2 * 64 * 4 * 16
    assert model_set.kv_move_s("x", 16) == pytest.approx(spec.kv_block_bytes * 0.001 / spec.weight_bytes)


def test_missing_profiles_are_named() -> None:
    store = load_profiles(None)
    with pytest.raises(ValueError, match="no profile for device 'TPU'"):
        select_kinds(store, "TPU", None)
    with pytest.raises(ValueError, match="no profile for Mixtral"):
        select_kinds(store, H100, ["Mixtral"])
    with pytest.raises(ValueError, match="no such profile file"):
        load_profiles("/nonexistent/profiles.json")


def test_the_scheduler_may_plan_with_other_profiles_than_the_clock() -> None:
    """As in a replayed live node: its scheduler predicts with engine-only profiles, its steps take longer."""
    spec = ModelSpec("x", "shape-x", 10**9, 1000, 4096)
    clock = Profile("shape-x", "float32", "cpu", (0.02, 0.0, 0.0), (0.015, 0.0, 0.0), 0.02)
    planned = Profile("shape-x", "float32", "cpu", (0.01, 0.0, 0.0), (0.010, 0.0, 0.0), 0.02)
    same = ModelSet({"x": spec}, {"x": clock})
    assert same.planner is same.predictor
    split = ModelSet({"x": spec}, {"x": clock}, planning_profiles={"x": planned})
    assert split.predictor.decode_s("x", [100]) == pytest.approx(0.015)
    assert split.planner.decode_s("x", [100]) == pytest.approx(0.010)
    with pytest.raises(ValueError, match="no profile for x"):
        ModelSet({"x": spec}, {"x": clock}, planning_profiles={})
