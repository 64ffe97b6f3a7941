"""The README's commands and examples, run as a reader would run them, so they cannot rot.

Model paths in the examples are placeholders; they are replaced by tiny demo models of the same
names, and the port by a free one. Everything else runs as written.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from tests.serve.serve_process import ServeProcess

README = Path(__file__).resolve().parents[1] / "README.md"
RUN_TIMEOUT_S = 300
README_PORT = "8000"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.DOTALL)


def block_with(language: str, marker: str) -> str:
    found = [block for block in blocks(language) if marker in block]
    assert len(found) == 1, f"expected one {language} block with {marker!r} in the README"
    return found[0]


def run_python(code: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )
    assert result.returncode == 0, result.stderr
    return result


def test_the_readme_serve_command_and_openai_client_example_work(demo_model_dirs, profile_path):
    line = next(line for line in block_with("bash", "aegaeon serve").splitlines() if "aegaeon serve" in line)
    argv = shlex.split(line.split("#", 1)[0])
    assert argv[:2] == ["aegaeon", "serve"]
    demo = {"llama": demo_model_dirs["llama"], "qwen": demo_model_dirs["qwen2"]}
    args = []
    for arg in argv[2:]:
        name, sep, _ = arg.partition("=")
        args.append(f"{name}={demo[name]}" if sep and name in demo else ("0" if arg == README_PORT else arg))
    with ServeProcess(*args, "--profiles", str(profile_path)) as server:
        url = server.wait_for(r"OpenAI API at (http://\S+)/v1").group(1)
        server.wait_for("Uvicorn running")
        example = block_with("python", "from openai import OpenAI")
        assert f"http://127.0.0.1:{README_PORT}" in example
        output = run_python(example.replace(f"http://127.0.0.1:{README_PORT}", url)).stdout
        assert output.strip(), "the example printed nothing"


def test_the_readme_offline_example_works(demo_model_dirs):
    example = block_with("python", "from aegaeon import LLM")
    for placeholder, model in (
        ("path/to/hf-model", "llama"),
        ("path/to/model-a", "llama"),
        ("path/to/model-b", "qwen2"),
    ):
        assert placeholder in example
        example = example.replace(placeholder, str(demo_model_dirs[model]))
    output = run_python(example).stdout
    assert output.count("length") + output.count("stop") >= 2  # each output's finish reason is printed


def test_the_readme_demo_models_command_writes_models(tmp_path):
    command = re.search(r"`(aegaeon demo-models [^`]+)`", README.read_text()).group(1)
    argv = shlex.split(command)
    result = subprocess.run(
        [sys.executable, "-m", "aegaeon.cli", *argv[1:]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr
    written = [Path(line) for line in result.stdout.split()]
    assert len(written) == int(argv[argv.index("--count") + 1])
    assert all((tmp_path / path / "config.json").exists() for path in written)


def test_the_configuration_reference_names_every_setting():
    from aegaeon.config import known_settings

    reference = (README.parent / "docs" / "configuration.md").read_text()
    missing = sorted(key for key in known_settings() if f"`{key}`" not in reference)
    assert not missing, f"docs/configuration.md does not describe {missing}"
