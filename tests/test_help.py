"""--help texts: complete descriptions, list defaults as one would type them."""

import pytest

import eval as eval_cli
import merge
import train


def help_of(main, capsys):
    """What `python script.py --help` prints: the script's main, run here (a process start spared)."""
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def test_train_help_lists_the_stages_after_its_description(capsys):
    text = help_of(train.main, capsys)
    assert "Also the two stages before it:" in text and "python train.py --stage reward" in text


def test_list_defaults_show_as_typed(capsys):
    merge_help = help_of(merge.main, capsys)
    assert "(default: 1)" in " ".join(merge_help.split()) and "['" not in merge_help  # not ['1']
    assert "(default: 0.0 0.1 0.2" in " ".join(help_of(eval_cli.main, capsys).split())
