"""A skipped cross-check fails the run when CI=true, and only then."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reference_checks import is_missing_library

ROOT = Path(__file__).resolve().parents[2]

SUITE = """
import pytest

def test_plain():
    assert 1 + 1 == 2

@pytest.mark.skip(reason="unrelated")
def test_other_skip():
    pass
"""
MISSING_TORCH = """
import pytest

# what pytest.importorskip("torch") does when torch is not installed
pytest.skip("could not import 'torch': No module named 'torch'", allow_module_level=True)
"""

MARKED = """
import pytest

@pytest.mark.reference
def test_cross_check():
    pytest.skip("no reference here")
"""
CONFTEST = """
from tests.reference_checks import (
    pytest_collection_modifyitems,
    pytest_collectreport,
    pytest_runtest_logreport,
    pytest_sessionfinish,
    pytest_terminal_summary,
)

def pytest_configure(config):
    config.addinivalue_line("markers", "reference: a cross-check")
"""


def _run(
    tmp_path: Path, files: dict[str, str], ci: str | None, *args: str
) -> subprocess.CompletedProcess:
    for name, text in {"conftest.py": CONFTEST, **files}.items():
        (tmp_path / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = str(ROOT)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_reason_of_importorskip_names_a_reference_library():
    assert is_missing_library("could not import 'torch': No module named 'torch'")
    assert is_missing_library("could not import 'onnxruntime': No module named 'onnxruntime'")
    assert not is_missing_library("could not import 'selenium': No module named 'selenium'")


@pytest.mark.slow  # pytest runs in subprocesses
@pytest.mark.parametrize("args", [(), ("-n", "2")], ids=["serial", "xdist"])
def test_skipped_cross_checks_fail_in_ci_only(tmp_path, args):
    files = {"test_suite.py": SUITE, "test_marked.py": MARKED, "test_torch.py": MISSING_TORCH}
    ci = _run(tmp_path, files, "true", *args)
    assert ci.returncode == 1, ci.stdout
    assert "FAILED: CI=true and 2 reference check(s) skipped" in ci.stdout
    assert "test_marked.py::test_cross_check" in ci.stdout and "test_torch.py" in ci.stdout
    local = _run(tmp_path, files, None, *args)
    assert local.returncode == 0, local.stdout
    assert "warning: 2 reference check(s) skipped" in local.stdout


@pytest.mark.slow
def test_other_skips_do_not_fail_ci(tmp_path):
    result = _run(tmp_path, {"test_suite.py": SUITE}, "true")
    assert result.returncode == 0, result.stdout
    assert "reference check" not in result.stdout
