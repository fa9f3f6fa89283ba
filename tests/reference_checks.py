"""Cross-checks against PyTorch and onnxruntime must run in CI, never skip quietly.

A test is a reference check if it is marked `reference` or if it skipped because torch, onnx or
onnxruntime could not be imported (pytest.importorskip). With CI=true in the environment, any
such skip fails the run, and the summary names the tests. tests/conftest.py installs the hooks.
"""

from __future__ import annotations

import os

import pytest

LIBRARIES = ("torch", "onnxruntime", "onnx")
"""The reference implementations a cross-check compares the engine with."""

_skipped: list[tuple[str, str]] = []  # (test id, skip reason)
_reference_ids: set[str] = set()


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def is_missing_library(reason: str) -> bool:
    """Return True if a skip reason is importorskip's for one of LIBRARIES."""
    return any(f"could not import '{lib}'" in reason for lib in LIBRARIES)


def _reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    _reference_ids.update(i.nodeid for i in items if i.get_closest_marker("reference"))


def _marked(report: pytest.TestReport | pytest.CollectReport) -> bool:
    # Under pytest-xdist the controller collects nothing: it knows a test's markers only
    # from the keywords its report carries.
    return report.nodeid in _reference_ids or "reference" in getattr(report, "keywords", {})


def _note(report: pytest.TestReport | pytest.CollectReport) -> None:
    if not report.skipped:
        return
    reason = _reason(report)
    if _marked(report) or is_missing_library(reason):
        _skipped.append((report.nodeid, reason))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _note(report)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _note(report)  # a module-level importorskip skips the whole file at collection


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped and in_ci() and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int) -> None:
    if not _skipped:
        return
    verdict = "FAILED: CI=true and" if in_ci() else "warning:"
    terminalreporter.section("reference checks")
    terminalreporter.write_line(
        f"{verdict} {len(_skipped)} reference check(s) skipped; install the test extra "
        "(pip install -e '.[test]') so torch, onnx and onnxruntime are present"
    )
    for nodeid, reason in _skipped:
        terminalreporter.write_line(f"  {nodeid}: {reason}")
