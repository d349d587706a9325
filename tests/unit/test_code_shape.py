"""Modules small enough to hold in one's head: no module over 500 lines, no function over 80.

The limits are the project's (README, "Shape of the code"); a module that grows past one says
it holds a second concern. A flat table may be exempted by name below, with the reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("optimizer", "operator", "simfleet", "tools")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
# "path:function" -> why it may be longer (a flat table, not logic). None today.
EXEMPT: dict[str, str] = {}


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_the_packages_hold_python_modules() -> None:
    # A renamed folder must not make the checks below vacuous.
    assert len(_modules()) > 100


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_is_over_the_limit(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{lines} lines: split it by concern"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_function_is_over_the_limit(path: Path) -> None:
    tree = ast.parse(path.read_text())
    rel = path.relative_to(ROOT)
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno is not None
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
            and f"{rel}:{node.name}" not in EXEMPT]
    assert not long, f"split into named steps: {', '.join(long)}"
