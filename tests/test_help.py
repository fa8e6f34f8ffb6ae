"""--help texts: complete descriptions, list defaults as one would type them."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def help_of(script):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True,
                          check=True).stdout


def test_train_help_lists_the_stages_after_its_description():
    text = help_of("train.py")
    assert "Also the two stages before it:" in text and "python train.py --stage reward" in text


def test_list_defaults_show_as_typed():
    assert "(default: 1)" in " ".join(help_of("merge.py").split())  # not ['1']
    assert "(default: 0.0 0.1 0.2" in " ".join(help_of("eval.py").split())
    assert "['" not in help_of("merge.py")
