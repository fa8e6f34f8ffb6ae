"""With CI set, a test dependency that cannot be imported fails the suite (conftest.py) instead of
skipping a module of parity tests in silence; without it, the skip is counted and explained."""

import os

import pytest
from conftest import ROOT

MODULE_NEEDS_IT = '''
import pytest
reference = pytest.importorskip("a_test_dependency_that_is_not_installed")

def test_parity():
    pass
'''
TEST_NEEDS_IT = '''
import pytest

def test_needs_it():
    pytest.importorskip("a_test_dependency_that_is_not_installed")

def test_needs_nothing():
    pass
'''


@pytest.mark.parametrize("ci", [True, False])
def test_a_missing_test_dependency_fails_only_in_ci(pytester, monkeypatch, ci):
    pytester.makepyfile(test_parity=MODULE_NEEDS_IT)  # a whole module skipped, as test_gpt2.py
    pytester.makepyfile(test_other=TEST_NEEDS_IT)  # one test skipped, as test_config.py's YAML test
    if ci:
        monkeypatch.setenv("CI", "true")
    else:
        monkeypatch.delenv("CI", raising=False)
    # this suite's settings and conftest.py, in a pytest session inside this process (a process start spared)
    result = pytester.runpytest_inprocess("-c", os.path.join(ROOT, "pyproject.toml"), "--rootdir", ROOT, "-p", "conftest",
                                          "--continue-on-collection-errors", str(pytester.path))
    out = result.stdout.str()
    if ci:
        assert result.ret != 0 and "1 failed, 1 passed, 1 error" in out, out
        assert out.count("CI is set and a test dependency is missing") >= 2, out
    else:
        assert result.ret == 0 and "skipped: 2" in out and "1 passed" in out, out
    assert "a_test_dependency_that_is_not_installed" in out
