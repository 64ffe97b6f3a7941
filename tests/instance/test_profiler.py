"""The profiler's grid, its outlier trimming, and a real profile of a tiny model on the CPU."""

from __future__ import annotations

import logging

import pytest

from aegaeon.config import BLOCK_SIZE, MIB, EngineConfig, NodeConfig, ProfileGrid
from aegaeon.engine.architecture import Architecture
from aegaeon.engine.engine import LLMEngine
from aegaeon.instance.node import Node
from aegaeon.instance.profiler import (
    DECODE_WARMUP_STEPS,
    geometric_points,
    plan_profile,
    profile_model,
    trimmed_time,
)
from aegaeon.scheduler.models import blocks_for_tokens
from aegaeon.scheduler.predictor import FitError, Profile, ProfileStore

# Enough points for two folds of three or more, few enough to profile in a second or two.
SMALL_GRID = ProfileGrid(prefill_points=6, batch_points=2, context_points=3, repeats=3, folds=2)


def test_geometric_points_span_both_ends_without_repeats() -> None:
    points = geometric_points(4, 2047, 10)
    assert points[0] == 4 and points[-1] == 2047
    assert points == sorted(set(points)) and len(points) == 10
    # Spaced geometrically: as many points below 100 as above.
    assert sum(p < 100 for p in points) >= 4
    assert geometric_points(1, 3, 10) == [1, 2, 3]  # no more points than integers
    assert geometric_points(16, 16, 5) == [16]


def test_trimming_drops_a_preempted_measurement() -> None:
    assert trimmed_time([1.0, 1.1, 0.9, 1.0, 30.0]) == pytest.approx(1.0)
    assert trimmed_time([0.002, 0.002, 0.002, 0.5]) == 0.002
    # Spread evenly, nothing is an outlier: the mean.
    assert trimmed_time([1.0, 2.0, 3.0]) == pytest.approx(2.0)


def test_the_grid_reaches_max_model_len_and_max_num_seqs() -> None:
    grid = ProfileGrid()
    plan = plan_profile(max_model_len=2048, max_num_seqs=64, kv_blocks=100_000, grid=grid)
    assert plan.prompt_lengths[0] <= 8 and plan.prompt_lengths[-1] == 2047
    assert len(plan.prompt_lengths) == grid.prefill_points
    batches = sorted({batch for batch, _ in plan.decode_points})
    assert batches[0] == 1 and batches[-1] == 64 and len(batches) == grid.batch_points
    grown = 1 + DECODE_WARMUP_STEPS + grid.repeats
    assert max(context for _, context in plan.decode_points) == 2048 - grown
    assert len(plan.decode_points) == grid.batch_points * grid.context_points


def test_decode_points_fit_the_kv_blocks() -> None:
    grid = ProfileGrid()
    kv_blocks = 256  # 4096 tokens: a batch of 64 cannot reach long contexts
    plan = plan_profile(max_model_len=1024, max_num_seqs=64, kv_blocks=kv_blocks, grid=grid)
    grown = 1 + DECODE_WARMUP_STEPS + grid.repeats
    for batch, context in plan.decode_points:
        assert batch * (blocks_for_tokens(context + grown) + 1) <= kv_blocks
    # Every batch size is still measured, up to the longest context that fits it.
    assert {batch for batch, _ in plan.decode_points} == set(geometric_points(1, 64, grid.batch_points))
    longest_at_64 = max(context for batch, context in plan.decode_points if batch == 64)
    assert longest_at_64 > (kv_blocks // 64 - 2) * BLOCK_SIZE - grown
    assert plan.prompt_lengths[-1] == 1023


def test_a_profile_of_a_tiny_model_reports_its_held_out_error(make_demo_model) -> None:
    engine = LLMEngine(
        models={"tiny": make_demo_model("llama", max_position_embeddings=128)},
        config=EngineConfig(kv_cache_bytes=4 * MIB, max_num_seqs=8),
        progress=False,
    )
    profile = profile_model(engine, "tiny", progress=False, grid=SMALL_GRID)
    assert profile.prefill_error is not None and profile.decode_error is not None
    assert profile.prefill_error.points == SMALL_GRID.prefill_points
    assert profile.decode_error.points == SMALL_GRID.batch_points * SMALL_GRID.context_points
    for error in (profile.prefill_error, profile.decode_error):
        assert error.r2 <= 1 and error.mean_relative_error >= 0
    assert "R²" in profile.describe_errors()
    assert 0 < profile.predict_prefill([8]) < profile.predict_prefill([127])
    assert profile.switch_s > 0
    # The engine is left idle: nothing of the profile's requests remains.
    assert not engine.has_unfinished_requests()


def test_a_node_logs_each_profile_s_held_out_error_at_start(make_demo_model, tmp_path, caplog) -> None:
    measured, old, noisy = make_demo_model("llama"), make_demo_model("qwen2"), make_demo_model("mistral")
    good = FitError(r2=0.987, mean_relative_error=0.042, points=25)
    poor = FitError(r2=0.31, mean_relative_error=0.56, points=25)
    prefill, decode = (1e-3, 1e-5, 0.0), (1e-3, 1e-6, 1e-4)
    profiles = ProfileStore(
        [
            Profile(_shape(measured), "float32", "cpu", prefill, decode, 0.01, good, good),
            # As written before held-out errors were measured: it still serves, and says so.
            Profile(_shape(old), "float32", "cpu", prefill, decode, 0.01),
            Profile(_shape(noisy), "float32", "cpu", prefill, decode, 0.01, good, poor),
        ]
    )
    path = tmp_path / "profiles.json"
    profiles.save(path)
    config = NodeConfig(profile_path=str(path), engine=EngineConfig(kv_cache_bytes=4 * MIB))
    caplog.set_level(logging.INFO, logger="aegaeon.instance.node")
    with Node({"measured": measured, "old": old, "noisy": noisy}, config, progress=False):
        records = [r for r in caplog.records if "latency profile" in r.getMessage()]
    by_model = {r.getMessage().split()[3]: r for r in records}
    assert set(by_model) == {"measured", "old", "noisy"}
    assert "prefill R² 0.987, mean relative error 4.2% (25 points)" in by_model["measured"].getMessage()
    assert by_model["measured"].levelno == logging.INFO
    assert "not measured" in by_model["old"].getMessage()
    assert "aegaeon profile" in by_model["old"].getMessage()
    # A fit that misses held-out points by more than the scheduler can absorb is a warning.
    assert by_model["noisy"].levelno == logging.WARNING
    assert "decode R² 0.310, mean relative error 56.0%" in by_model["noisy"].getMessage()
    assert "re-profile on a quiet machine" in by_model["noisy"].getMessage()


def _shape(path) -> str:
    return Architecture.from_pretrained(path).shape_key


def test_a_model_too_short_to_profile_is_refused_with_a_reason(make_demo_model) -> None:
    engine = LLMEngine(
        models={"short": make_demo_model("llama")},
        config=EngineConfig(kv_cache_bytes=4 * MIB, max_model_len=8),
        progress=False,
    )
    with pytest.raises(ValueError, match="cannot profile short: a max_model_len of 8"):
        profile_model(engine, "short", progress=False, grid=SMALL_GRID)
