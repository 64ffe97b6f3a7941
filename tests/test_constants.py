"""Each constant is defined in one module: two modules that each spell out a block size, an instance
role or a smoothing factor drift apart the day one of them changes."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import aegaeon

PACKAGE = Path(aegaeon.__file__).parent
# Names two modules may each define, and why. Empty: every constant has one home.
ALLOWED_TWICE: dict[str, str] = {}


def _literal(node: ast.expr) -> bool:
    try:
        ast.literal_eval(node)
    except ValueError:
        return False
    return True


def module_constants(source: str) -> set[str]:
    """UPPER_CASE names a module assigns a literal at its top level (`A = 1`, `A, B = "a", "b"`)."""
    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        for target in targets:
            if isinstance(target, ast.Name):
                pairs = [(target, value)]
            elif isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple):
                pairs = list(zip(target.elts, value.elts, strict=False))
            else:
                continue
            names |= {
                t.id for t, v in pairs if isinstance(t, ast.Name) and t.id.isupper() and _literal(v)
            }
    return names


def test_the_scan_finds_plain_and_unpacked_constants() -> None:
    source = 'A = 1\nB, C = "b", (1, 2)\nlower = 2\nD = compute()\ndef f():\n    E = 3\nF: float = 0.5\n'
    assert module_constants(source) == {"A", "B", "C", "F"}


def test_no_constant_is_defined_in_two_modules() -> None:
    defined: dict[str, list[str]] = defaultdict(list)
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 50
    for path in modules:
        for name in module_constants(path.read_text()):
            defined[name].append(str(path.relative_to(PACKAGE.parent)))
    twice = {name: paths for name, paths in defined.items() if len(paths) > 1 and name not in ALLOWED_TWICE}
    assert not twice, f"define each once (config.py or the owning module) and import it: {twice}"
