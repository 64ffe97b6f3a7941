"""The Triton paged decode kernel against the torch reference (interpreted on the CPU, compiled on CUDA)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aegaeon.engine.attention_triton import paged_decode_attention
from tests.engine.test_paged_decode import DTYPE_NAMES, check_kernel_against_reference

REPO_ROOT = Path(__file__).resolve().parents[2]
INTERPRETER_TIMEOUT_S = 120


def _run_interpreter_check(dtype_name: str) -> None:
    """Entry point of the TRITON_INTERPRET=1 subprocess: exit non-zero listing mismatches."""
    failures = check_kernel_against_reference(paged_decode_attention, DTYPE_NAMES[dtype_name], "cpu")
    if failures:
        sys.exit("\n".join(failures))


@pytest.mark.parametrize("dtype_name", list(DTYPE_NAMES))
def test_kernel_matches_reference_in_interpreter(dtype_name: str) -> None:
    """Triton kernel under TRITON_INTERPRET=1 (CPU) matches the torch reference."""
    pytest.importorskip("triton", reason="triton is not installed; the kernel cannot be interpreted")
    # TRITON_INTERPRET is read when triton is imported, which this process has already done.
    python_path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": python_path}
    code = f"from {__name__} import _run_interpreter_check; _run_interpreter_check({dtype_name!r})"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=INTERPRETER_TIMEOUT_S,
    )
    assert proc.returncode == 0, f"interpreted kernel mismatches:\n{proc.stdout}\n{proc.stderr}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype_name", list(DTYPE_NAMES))
def test_kernel_matches_reference_on_cuda(dtype_name: str) -> None:
    """Compiled Triton kernel on a real GPU matches the torch reference."""
    pytest.importorskip("triton", reason="triton is not installed")
    failures = check_kernel_against_reference(paged_decode_attention, DTYPE_NAMES[dtype_name], "cuda")
    assert not failures, "\n".join(failures)
