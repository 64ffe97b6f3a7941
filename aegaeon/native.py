"""The package's C sources, built for this CPU with the system's C compiler and loaded with ctypes.

A library is compiled on first use into `KERNEL_CACHE_DIR`, one file per source, flags, compiler and
CPU (`-march=native` output runs only where it was built). Where no compiler is found, or the build
fails, `load` logs why and returns None: each caller keeps a slower path that gives the same results.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from aegaeon.config import KERNEL_CACHE_DIR

log = logging.getLogger(__name__)

COMPILE_TIMEOUT_S = 120


def _cpu_signature() -> str:
    """What `-march=native` depends on: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo") as info:
            lines = [line for line in info if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _build(source: Path, flags: Sequence[str], compiler: str) -> Path:
    text = source.read_bytes()
    key = hashlib.sha256(b"\0".join([text, " ".join(flags).encode(), compiler.encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]  # fmt: skip
    directory = Path(KERNEL_CACHE_DIR).expanduser()
    target = directory / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    # Compile beside the target and rename: instance processes starting together may all build it.
    fd, partial = tempfile.mkstemp(dir=directory, suffix=".so.partial")
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *flags, str(source), "-o", partial, "-lm"],
            check=True, capture_output=True, timeout=COMPILE_TIMEOUT_S,
        )  # fmt: skip
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def load_library(source: Path, flags: Sequence[str], what: str, fallback: str) -> ctypes.CDLL | None:
    """`source` built with `flags` and loaded; None (and a warning naming `what` and the `fallback`
    its callers take) where it cannot be."""
    compiler = _compiler()
    if compiler is None:
        log.warning("no C compiler found: %s", fallback)
        return None
    try:
        return ctypes.CDLL(str(_build(source, flags, compiler)))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", b"") or b""
        log.warning(
            "building %s failed (%s%s): %s",
            what, error, ": " + detail.decode(errors="replace")[-2000:] if detail else "", fallback,
        )  # fmt: skip
        return None
