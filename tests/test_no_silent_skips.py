"""With CI set, a test dependency that cannot be imported fails the suite (conftest.py) instead of
skipping a module of parity tests in silence; without it, the skip is counted and explained."""

import os
import subprocess
import sys

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
def test_a_missing_test_dependency_fails_only_in_ci(tmp_path, ci):
    (tmp_path / "test_parity.py").write_text(MODULE_NEEDS_IT)  # a whole module skipped, as test_gpt2.py
    (tmp_path / "test_other.py").write_text(TEST_NEEDS_IT)  # one test skipped, as test_config.py's YAML test
    env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": "true"} if ci else {})
    out = subprocess.run([sys.executable, "-m", "pytest", "-c", os.path.join(ROOT, "pyproject.toml"), "--rootdir", ROOT,
                          "-p", "conftest", "--continue-on-collection-errors", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    if ci:
        assert out.returncode != 0 and "1 failed, 1 passed, 1 error" in out.stdout, out.stdout
        assert out.stdout.count("CI is set and a test dependency is missing") >= 2, out.stdout
    else:
        assert out.returncode == 0 and "skipped: 2" in out.stdout and "1 passed" in out.stdout, out.stdout
    assert "a_test_dependency_that_is_not_installed" in out.stdout
