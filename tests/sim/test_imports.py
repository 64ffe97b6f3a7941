"""The simulator is torch-free like the scheduler it drives: it runs far faster than real time."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import aegaeon.sim
import aegaeon.sim.policies


def test_no_simulator_module_imports_torch() -> None:
    modules = ["aegaeon.sim", "aegaeon.sim.policies"]
    modules += [f"aegaeon.sim.{m.name}" for m in pkgutil.iter_modules(aegaeon.sim.__path__)]
    modules += [f"aegaeon.sim.policies.{m.name}" for m in pkgutil.iter_modules(aegaeon.sim.policies.__path__)]
    assert len(modules) >= 20
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n"
        "assert 'aegaeon.engine' not in sys.modules\n"
        "assert 'matplotlib' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
