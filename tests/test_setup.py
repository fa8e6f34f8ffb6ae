"""The two commands of the README's first section, and the CI script that runs the test one."""

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def first_section_commands():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("\n## ")[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)[1]
    return [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]


def test_readme_starts_with_two_commands():
    assert first_section_commands() == ["make demo", "make test"]


def test_ci_runs_the_readme_test_command():
    lines = [line.strip() for line in open(os.path.join(ROOT, ".ci", "run")) if line.strip() and not line.startswith("#")]
    assert lines[-1] == first_section_commands()[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
@pytest.mark.parametrize("target, extra, last", [("test", "dev", "-m pytest"), ("demo", "plot", "reproduce.py")])
def test_make_sets_up_a_fresh_venv_torch_pinned_first(target, extra, last, tmp_path):
    venv = str(tmp_path / "venv")
    out = subprocess.run(["make", "-n", "-B", "-C", ROOT, target, f"VENV={venv}"], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    commands = [line for line in out if not line.startswith(("touch", "make"))]
    assert commands[0] == f"python3 -m venv {venv}"
    assert commands[1] == f"{venv}/bin/pip install -q torch==2.13.0"
    assert commands[2] == f'{venv}/bin/pip install -q -e ".[{extra}]"'
    assert commands[3].startswith(f"{venv}/bin/python {last}")
