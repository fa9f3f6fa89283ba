"""Floors point down: engine imports no worker/service/flask/redis/rq; worker no service;
service no rq (it goes through the job contract in worker/contract/)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FORBIDDEN = {
    "engine": {"worker", "service", "flask", "redis", "rq"},
    "worker": {"service", "flask"},
    "service": {"rq"},
}


def _imports(path: Path) -> set[str]:
    """Return the top-level package of every absolute import in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_nothing_from_above(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    wrong = {
        str(path.relative_to(ROOT)): sorted(_imports(path) & FORBIDDEN[package])
        for path in files
        if _imports(path) & FORBIDDEN[package]
    }
    assert wrong == {}


def test_the_check_sees_nested_and_from_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from rq.job import Job\n    import redis.client\n")
    assert _imports(probe) == {"rq", "redis"}
