"""`aegaeon serve` as a user starts it: flags or a YAML file, a startup line with a curl that works."""

from __future__ import annotations

import argparse
import shlex
import signal
import subprocess
import sys

import pytest
import yaml

from aegaeon.cli import build_parser, serve_config_from_args
from aegaeon.config import build_serve_config
from tests.serve.serve_process import ServeProcess


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_flags_override_the_yaml_file(tmp_path):
    config_file = tmp_path / "pool.yaml"
    config_file.write_text(
        yaml.safe_dump(
            {
                "models": [{"name": "a", "path": "/m/a", "ttft_s": 2.0}, "b=/m/b"],
                "port": 9000,
                "tbt_s": 0.05,
                "kv_cache_bytes": 1 << 20,
            }
        )
    )
    config = serve_config_from_args(
        parse("--config", str(config_file), "--port", "9100", "--prefill-instances", "2")
    )
    assert [(m.name, m.path) for m in config.models] == [("a", "/m/a"), ("b", "/m/b")]
    assert config.port == 9100
    assert not config.node.colocated and config.node.prefill_instances == 2
    assert config.node.engine.kv_cache_bytes == 1 << 20
    assert config.node.scheduler.slo("a").ttft_s == 2.0 and config.node.scheduler.slo("b").tbt_s == 0.05


def test_models_from_paths_are_named_by_their_last_part():
    config = serve_config_from_args(parse("/models/qwen-tiny/", "x=/other"))
    assert [m.name for m in config.models] == ["qwen-tiny", "x"]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"models": ["a=/m"], "prot": 1}, "unknown setting"),
        ({}, "at least one model"),
        ({"models": ["a=/m", "a=/n"]}, "unique"),
        ({"models": ["a=/m"], "port": 70000}, "port"),
        ({"models": ["a=/m"], "tbt_s": -1}, "positive"),
    ],
)
def test_bad_settings_say_what_to_fix(settings, message):
    with pytest.raises(ValueError, match=message):
        build_serve_config(settings)


def test_serve_prints_a_curl_line_that_returns_a_completion(demo_model_dirs, profile_path):
    models = [f"{arch}={demo_model_dirs[arch]}" for arch in ("llama", "qwen2")]
    with ServeProcess(*models, "--port", "0", "--profiles", str(profile_path)) as server:
        curl = server.wait_for(r"try:\s+(.*)$").group(1).strip()
        server.wait_for("Uvicorn running")
        out = subprocess.run(shlex.split(curl) + ["-s"], capture_output=True, text=True, timeout=60)
        assert '"object":"chat.completion"' in out.stdout, out.stdout
        assert '"completion_tokens":16' in out.stdout
        # uvicorn re-raises SIGTERM once it has shut down gracefully, so that is the exit status.
        assert server.stop() in (0, -signal.SIGTERM)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--role", "node", "a=/m"], "redis_url"),
        (["--role", "api", "--redis-url", "redis://127.0.0.1:1/0", "a=/m"], "name models on the nodes"),
        (["--role", "cluster", "a=/m"], "invalid choice"),
        (
            ["--role", "node", "--host", "0.0.0.0", "--redis-url", "redis://127.0.0.1:1/0", "a=/m"],
            "without cluster keys",
        ),
    ],
)
def test_roles_that_cannot_work_are_refused_with_what_to_fix(argv, message):
    result = subprocess.run(
        [sys.executable, "-m", "aegaeon.cli", "serve", *argv], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_api_keys_come_from_the_flag_and_a_keys_file(tmp_path):
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# team a\nkey-a\n\n  key-b  \n")
    config = serve_config_from_args(parse("a=/m", "--api-key", "key-0", "--api-key-file", str(keys_file)))
    assert config.api_keys == ("key-0", "key-a", "key-b")
    keys_file.write_text("# nothing but comments\n")
    with pytest.raises(SystemExit, match="holds no key"):
        serve_config_from_args(parse("a=/m", "--api-key-file", str(keys_file)))
    with pytest.raises(SystemExit, match="cannot read the API keys file"):
        serve_config_from_args(parse("a=/m", "--api-key-file", str(tmp_path / "missing")))


def test_request_limits_come_from_flags_and_yaml(tmp_path):
    config_file = tmp_path / "pool.yaml"
    config_file.write_text(yaml.safe_dump({"models": ["a=/m"], "max_output_tokens": 256, "max_n": 2}))
    config = serve_config_from_args(
        parse("--config", str(config_file), "--max-n", "4", "--max-body-bytes", "1024")
    )
    assert (config.limits.max_n, config.limits.max_output_tokens, config.limits.max_body_bytes) == (
        4,
        256,
        1024,
    )


def test_the_admin_key_comes_from_the_flag_the_environment_or_yaml(tmp_path, monkeypatch):
    monkeypatch.delenv("AEGAEON_ADMIN_KEY", raising=False)
    config_file = tmp_path / "pool.yaml"
    config_file.write_text(yaml.safe_dump({"models": ["a=/m"], "admin_key": "from-yaml"}))
    assert serve_config_from_args(parse("a=/m")).admin_key is None  # no admin routes
    assert serve_config_from_args(parse("--config", str(config_file))).admin_key == "from-yaml"
    monkeypatch.setenv("AEGAEON_ADMIN_KEY", "from-env")
    assert serve_config_from_args(parse("--config", str(config_file))).admin_key == "from-env"
    assert serve_config_from_args(parse("a=/m", "--admin-key", "from-flag")).admin_key == "from-flag"
    with pytest.raises(SystemExit, match="admin_key must differ from every API key"):
        serve_config_from_args(parse("a=/m", "--api-key", "same", "--admin-key", "same"))
