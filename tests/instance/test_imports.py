"""An instance depends on its node only through the `NodeServices` protocol: no import cycle."""

from __future__ import annotations

import subprocess
import sys


def test_importing_an_instance_does_not_import_the_node() -> None:
    code = (
        "import sys\n"
        "import aegaeon.instance.instance\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('aegaeon.instance.'))\n"
        "assert 'aegaeon.instance.node' not in sys.modules, loaded\n"
        "print(' '.join(loaded))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "aegaeon.instance.instance" in result.stdout.split()
