"""sample.py: K completions per prompt of several models side by side, with the same random
numbers for every model, and their rewards; on the tiny fixture models."""

import json
import os
import shutil

import pytest
import torch

import sample as sample_cli
from conftest import perturbed_copy
from nanowarp.models.gpt2 import GPT2, GPT2Config


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Models this small run faster on one thread (see test_eval.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tiny_gpt2_dir, tmp_path_factory):
    """The tiny GPT-2, a copy of it in another folder, and another model (perturbed)."""
    copy = str(tmp_path_factory.mktemp("copy") / "gpt2")
    shutil.copytree(tiny_gpt2_dir, copy)
    return dict(base=tiny_gpt2_dir, copy=copy,
                other=perturbed_copy(tiny_gpt2_dir, str(tmp_path_factory.mktemp("other")), 1, 0.1))


def run(capsys, *flags):
    """sample.py FLAGS --json, here; its JSON."""
    sample_cli.main(["--num_samples", "3", "--max_new_tokens", "6", "--device", "cpu", *flags, "--json"])
    return json.loads(capsys.readouterr().out)


def samples(result, prompt=0, model=0):
    return result["prompts"][prompt]["models"][model]["samples"]


def test_the_same_seed_gives_the_same_completions(models, capsys):
    flags = ["--model", models["base"], "--prompt", "This movie was"]
    first = run(capsys, *flags)
    assert run(capsys, *flags) == first
    assert samples(run(capsys, *flags, "--seed", "1")) != samples(first)


def test_copies_of_a_model_write_the_same_completions_and_another_model_others(models, capsys):
    result = run(capsys, "--model", models["base"], models["copy"], models["other"], "--prompt", "This movie was",
                 "--prompt", "I hated")
    for p in range(2):
        base, copy, other = (samples(result, p, m) for m in range(3))
        assert copy == base  # the same random numbers: the same text
        assert [s["completion"] for s in other] != [s["completion"] for s in base]
    assert samples(result, 0) != samples(result, 1)


def test_json_holds_every_prompt_model_and_sample(models, tmp_path, capsys):
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "A film"}) + "\n")
    result = run(capsys, "--model", models["base"], models["other"], "--prompt", "This movie was",
                 "--prompts", str(tmp_path / "prompts.jsonl"), "--seed", "5")
    assert result["models"] == [models["base"], models["other"]]
    assert (result["seed"], result["num_samples"], result["max_new_tokens"], result["temperature"]) == (5, 3, 6, 1.0)
    assert [p["prompt"] for p in result["prompts"]] == ["This movie was", "A film"]
    for p in result["prompts"]:
        assert [m["model"] for m in p["models"]] == result["models"]
        for m in p["models"]:
            assert len(m["samples"]) == 3
            for s in m["samples"]:
                assert set(s) == {"completion", "finished", "length"}  # no classifier, no scores
                assert 1 <= s["length"] <= 6 and isinstance(s["completion"], str)


def test_rewards_follow_the_no_eos_rule_and_the_judge_scores_every_completion(models, tiny_reward_dir, judge_dir,
                                                                               capsys):
    result = run(capsys, "--model", models["base"], "--prompt", "This movie was", "--num_samples", "8",
                 "--reward_model", tiny_reward_dir, "--judge", judge_dir)
    for s in samples(result):
        assert 0 <= s["reward"] <= 1 if s["finished"] else s["reward"] == -1.0
        assert 0 <= s["judge"] <= 1


def test_the_table_shows_every_model_and_score(models, tiny_reward_dir, capsys):
    sample_cli.main(["--model", models["base"], models["other"], "--prompt", "This movie was", "--num_samples", "2",
                     "--max_new_tokens", "4", "--device", "cpu", "--reward_model", tiny_reward_dir])
    out = capsys.readouterr().out
    assert "=== prompt 1/1: 'This movie was'" in out and "--- sample 2" in out
    lines = [line for line in out.splitlines() if line.startswith((models["base"], models["other"]))]
    assert len(lines) == 2 * 2 and all("reward" in line for line in lines)


@pytest.fixture(scope="module")
def other_vocabulary(tiny_gpt2_dir, tmp_path_factory):
    """A GPT-2 with a larger vocabulary than the tiny one."""
    folder = str(tmp_path_factory.mktemp("vocab"))
    config = GPT2.from_pretrained(tiny_gpt2_dir).config
    GPT2(GPT2Config(**{**config.__dict__, "vocab_size": config.vocab_size + 8})).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("flags, message", [
    (["--model", "BASE"], "no prompt: give --prompt"),
    (["--model", "BASE", "--prompt", "Hi", "--num_samples", "0"], "--num_samples must be >= 1"),
    (["--model", "BASE", "--prompt", "Hi", "--max_new_tokens", "200"], "--max_new_tokens 200 leaves no room for"),
    (["--model", "BASE", "MISSING", "--prompt", "Hi"], "no checkpoint folder at"),
    (["--model", "BASE", "OTHER_VOCAB", "--prompt", "Hi"], "but the first --model has vocab_size="),
    (["--model", "BASE", "--prompts", "MISSING"], "no prompt file at"),
])
def test_user_errors_are_one_line(models, other_vocabulary, tmp_path, capsys, flags, message):
    names = {"BASE": models["base"], "MISSING": str(tmp_path / "gone"), "OTHER_VOCAB": other_vocabulary}
    with pytest.raises(SystemExit) as exited:
        sample_cli.main([names.get(f, f) for f in flags] + ["--device", "cpu"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sample.py: error: ") and "\n" not in err and message in err, err
