"""--config PATH (nanowarp.config.parse_args, so train.py, eval.py, reproduce.py and the others):
flags from a JSON or YAML file, under the command line's and over --preset's; a train.py job's
job.json replays the job."""

import json
import os
import sys

import pytest

import eval as eval_cli
import merge
import train
from conftest import assert_same_weights, final_weights, in_process
from nanowarp.config import PRESETS, Config, parse_args


def write(path, values):
    path.write_text(json.dumps(values))
    return str(path)


def error_of(parse, argv, capsys):
    """The one line of stderr of a user error, which exits with status 2."""
    with pytest.raises(SystemExit) as exited:
        parse(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err.strip()


def test_replaying_a_jobs_job_json_gives_the_same_weights(reference_job, reference, tmp_path):
    """job.json holds every flag of the job (out_dir, fresh and preset too): with --out_dir changed,
    the same job again."""
    out = str(tmp_path / "replay")
    assert in_process(train.main, ["--config", os.path.join(reference_job, "job.json"), "--out_dir", out]) == 0
    assert_same_weights(final_weights(out), reference)
    earlier, now = (json.load(open(os.path.join(folder, "job.json"))) for folder in (reference_job, out))
    assert {k: v for k, v in now.items() if k != "out_dir"} == {k: v for k, v in earlier.items() if k != "out_dir"}


def test_the_file_sets_flags_and_the_command_line_overrides_it(tmp_path):
    path = write(tmp_path / "c.json", {"lr": 0.5, "steps": 7, "whiten": True, "merge": "lerp"})
    cfg = parse_args(["--config", path, "--steps", "9"])
    assert (cfg.lr, cfg.steps, cfg.whiten, cfg.merge) == (0.5, 9, True, "lerp")
    assert parse_args(["--config", path, "--no-whiten"]).whiten is False


def test_the_file_overrides_the_preset_and_may_name_it(tmp_path):
    cfg = parse_args(["--config", write(tmp_path / "c.json", {"preset": "tiny", "steps": 7})])
    assert cfg.preset == "tiny" and cfg.steps == 7 and cfg.lora_rank == PRESETS["tiny"]["lora_rank"]
    cfg = parse_args(["--preset", "tiny", "--config", write(tmp_path / "d.json", {"lora_rank": 3})])
    assert cfg.lora_rank == 3 and cfg.steps == PRESETS["tiny"]["steps"]
    cfg = parse_args(["--config", str(tmp_path / "c.json"), "--preset", "reference"])  # the command line's preset
    assert cfg.preset == "reference" and cfg.steps == 7 and cfg.lora_rank == Config.lora_rank


def test_lists_and_nulls_take_their_flags_values(tmp_path):
    path = write(tmp_path / "c.json", {"models": ["a", "b"], "etas": [0, 0.5], "temperature": None, "seed": 3})
    args = eval_cli.parse_args(["--config", path])
    assert (args.models, args.etas, args.temperature, args.seed) == (["a", "b"], [0.0, 0.5], None, 3)


def test_a_file_may_give_a_required_flag(tmp_path):
    args = merge.parse_args(["--config", write(tmp_path / "c.json", {"init": "a", "policies": ["b", "c"]}),
                             "--out", "o"])
    assert (args.init, args.policies, args.out) == ("a", ["b", "c"], "o")


def test_a_missing_required_flag_is_still_an_error(capsys):
    with pytest.raises(SystemExit) as exited:
        merge.parse_args(["--init", "a"])
    assert exited.value.code == 2
    assert "the following arguments are required: --policies, --out" in capsys.readouterr().err


def test_unknown_keys_are_an_error_naming_them(tmp_path, capsys):
    err = error_of(parse_args, ["--config", write(tmp_path / "c.json", {"lr": 0.5, "nope": 1, "zap": 2})], capsys)
    assert "\n" not in err and "error: --config" in err and "unknown flags 'nope', 'zap'" in err


def test_a_missing_config_file_is_an_error(tmp_path, capsys):
    err = error_of(parse_args, ["--config", str(tmp_path / "gone.json")], capsys)
    assert "\n" not in err and "cannot read --config" in err and "gone.json" in err


@pytest.mark.parametrize("values, message", [({"whiten": 1}, "whiten must be true or false"),
                                             ({"steps": [1, 2]}, "steps must be one value"),
                                             ({"lr": None}, "lr needs a value")])
def test_a_value_of_the_wrong_kind_is_an_error(tmp_path, capsys, values, message):
    assert message in error_of(parse_args, ["--config", write(tmp_path / "c.json", values)], capsys)


def test_a_file_that_is_not_json_is_an_error(tmp_path, capsys):
    (tmp_path / "c.json").write_text("{lr: 0.5")
    assert "is not valid JSON" in error_of(parse_args, ["--config", str(tmp_path / "c.json")], capsys)


def test_a_yaml_file(tmp_path):
    pytest.importorskip("yaml")
    (tmp_path / "c.yaml").write_text("lr: 0.5\nsteps: 7\nwhiten: true\nmerge: lerp\nreward_label: null\n")
    cfg = parse_args(["--config", str(tmp_path / "c.yaml"), "--steps", "9"])
    assert (cfg.lr, cfg.steps, cfg.whiten, cfg.merge, cfg.reward_label) == (0.5, 9, True, "lerp", None)


def test_a_yaml_file_without_pyyaml_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml raises ImportError
    (tmp_path / "c.yml").write_text("lr: 0.5\n")
    assert "pip install pyyaml" in error_of(parse_args, ["--config", str(tmp_path / "c.yml")], capsys)
