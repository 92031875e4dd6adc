"""Fixtures shared by several test files."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def short_dir(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, unless it is too long for unix socket paths (108 bytes) under CI's temp root."""
    if len(str(tmp_path)) <= 70:
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="vdp", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


# CI sets VALVE_NO_SKIP=1: a test that skips there (a missing optional dependency, a tool not installed) fails
# instead, so a green run means every test ran. Only tests that need what CI cannot have may skip.
SKIP_ALLOWED_MARKERS = {"cluster"}  # a real cluster through KUBECONFIG


def _no_skip() -> bool:
    return os.environ.get("VALVE_NO_SKIP") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if _no_skip() and report.skipped and not hasattr(report, "wasxfail") \
            and not SKIP_ALLOWED_MARKERS & {m.name for m in item.iter_markers()}:
        report.outcome = "failed"
        report.longrepr = f"skipped under VALVE_NO_SKIP=1 (every test must run in CI): {report.longrepr}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if _no_skip() and report.skipped:  # a whole module skipped (e.g. importorskip at module level)
        report.outcome = "failed"
        report.longrepr = f"module skipped under VALVE_NO_SKIP=1 (every test must run in CI): {report.longrepr}"
