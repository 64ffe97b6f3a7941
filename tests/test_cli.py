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
    out = aegaeon("profile", f"tiny={demo_model_dirs['qwen3']}", "--profiles", str(path))
    printed = json.loads(out.stdout.splitlines()[0])
    assert printed["model"] == "tiny" and printed["device"] == "cpu" and printed["dtype"] == "float32"
    (profile,) = list(ProfileStore.load(path))
    assert profile.switch_s > 0
    # Longer prompts and bigger batches are predicted to take longer, as they do.
    assert 0 < profile.predict_prefill([8]) < profile.predict_prefill([256])
    assert 0 < profile.predict_decode([16]) < profile.predict_decode([16] * 16)


def test_help_lists_the_commands():
    out = aegaeon("--help")
    for command in ("demo-models", "bench", "profile"):
        assert command in out.stdout
