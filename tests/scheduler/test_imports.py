"""The scheduler package is torch-free: the simulator imports it thousands of times faster than torch."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import aegaeon.scheduler


def test_no_scheduler_module_imports_torch() -> None:
    modules = ["aegaeon.scheduler"] + [
        f"aegaeon.scheduler.{m.name}" for m in pkgutil.iter_modules(aegaeon.scheduler.__path__)
    ]
    assert len(modules) >= 8  # package, models, request, predictor, prefill, decode, slo, timeline
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n"
        "assert 'aegaeon.engine' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
