"""The layering of DESIGN.md §1, read from the import statements of every module.

`shared` imports nothing of ours; `controller` and `edge_agent` import `shared`
and never each other, nor `broker` (the composition root used by the CLI,
demo and tests).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"shared", "controller", "edge_agent", "broker"}
FORBIDDEN = {
    "shared": {"controller", "edge_agent", "broker"},
    "controller": {"edge_agent", "broker"},
    "edge_agent": {"controller", "broker"},
}


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & OURS


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_respect_the_layers(package: str) -> None:
    """No module of `package` imports a package it must not depend on."""
    modules = sorted((ROOT / package).rglob("*.py"))
    assert modules
    for module in modules:
        bad = imported_packages(module) & FORBIDDEN[package]
        assert not bad, f"{module.relative_to(ROOT)} imports {sorted(bad)}"
