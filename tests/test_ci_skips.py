"""CI runs with VALVE_NO_SKIP=1: a skipped test fails the run, except those that need a real cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]
CONFTEST = (Path(__file__).parent / "conftest.py").read_text()
TESTS = '''
import pytest

def test_runs():
    pass

def test_skips():
    pytest.skip("optional tool missing")

@pytest.mark.cluster
def test_needs_a_cluster():
    pytest.skip("needs a real cluster through KUBECONFIG")
'''


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\nmarkers =\n    cluster: needs a real cluster\n")
    pytester.makepyfile(test_probe=TESTS)
    return pytester


def test_a_skip_fails_under_ci(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VALVE_NO_SKIP", "1")
    result = suite.runpytest_inprocess("-q")
    result.assert_outcomes(passed=1, failed=1, skipped=1)
    result.stdout.fnmatch_lines(["*every test must run in CI*optional tool missing*"])


def test_a_module_skip_fails_under_ci(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VALVE_NO_SKIP", "1")
    suite.makepyfile(test_module='import pytest\npytest.importorskip("no_such_module_here")\n')
    result = suite.runpytest_inprocess("-q", "test_module.py")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*every test must run in CI*no_such_module_here*"])


def test_skips_are_plain_skips_elsewhere(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VALVE_NO_SKIP", raising=False)
    suite.runpytest_inprocess("-q").assert_outcomes(passed=1, skipped=2)
