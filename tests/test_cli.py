"""The `aegaeon` command line, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

from aegaeon.scheduler.predictor import ProfileStore


def aegaeon(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "aegaeon.cli", *args], capture_output=True, text=True, check=True, timeout=300
    )


def test_profile_measures_and_stores_a_usable_profile(demo_model_dirs, tmp_path):
    path = tmp_path / "profiles.json"
    grid = ("--prefill-points", "6", "--batch-points", "2", "--context-points", "3", "--repeats", "3")
    out = aegaeon(
        "profile", f"tiny={demo_model_dirs['qwen3']}", "--profiles", str(path), *grid, "--folds", "2"
    )
    printed = json.loads(out.stdout.splitlines()[0])
    assert printed["model"] == "tiny" and printed["device"] == "cpu" and printed["dtype"] == "float32"
    # The fit's error on points it was not fitted on is shown, and stored with the profile.
    shown = out.stdout.splitlines()[1]
    assert (
        shown.startswith("tiny (") and "prefill R²" in shown and "decode R²" in shown and "held out" in shown
    )
    assert printed["prefill_error"]["points"] == 6 and printed["decode_error"]["points"] == 6
    (profile,) = list(ProfileStore.load(path))
    assert profile.switch_s > 0
    # Longer prompts and bigger batches are predicted to take longer, as they do (the grid's ends,
    # whose times differ most).
    assert 0 < profile.predict_prefill([4]) < profile.predict_prefill([511])
    assert 0 < profile.predict_decode([16]) < profile.predict_decode([500] * 64)


def test_profile_refuses_a_grid_too_sparse_to_fit(demo_model_dirs, tmp_path):
    path = tmp_path / "profiles.json"
    args = [sys.executable, "-m", "aegaeon.cli", "profile", f"tiny={demo_model_dirs['qwen3']}"]
    out = subprocess.run(
        [*args, "--profiles", str(path), "--prefill-points", "2"], capture_output=True, text=True
    )
    assert out.returncode != 0 and "prefill_points must be >= 3" in out.stderr
    assert not path.exists()


def test_help_lists_the_commands():
    out = aegaeon("--help")
    for command in ("demo-models", "bench", "profile"):
        assert command in out.stdout
