"""Tests for merge.py: SLERP/LERP + LITI of tiny GPT-2 checkpoints, and what it refuses."""

import os
import subprocess
import sys

import pytest
import torch

import merge
from conftest import perturbed_copy
from nanowarp import hub, merging
from nanowarp.models import save_policy
from nanowarp.models.gpt2 import GPT2, GPT2Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def weights(folder):
    return GPT2.from_pretrained(folder).hf_state_dict()


@pytest.fixture(scope="module")
def runs(tiny_gpt2_dir, tmp_path_factory):
    """Three fake fine-tuned runs of the tiny GPT-2, and a fake SFT base."""
    folder = tmp_path_factory.mktemp("runs")
    return [perturbed_copy(tiny_gpt2_dir, str(folder / name), seed) for seed, name in enumerate(["a", "b", "c", "sft"])]


def assert_same_weights(folder, expected):
    found, _ = hub.load_state_dict(folder)
    assert found.keys() == expected.keys()
    for k in expected:
        assert torch.equal(found[k], expected[k]), k


def test_slerp_output_equals_merging_slerp(tiny_gpt2_dir, runs, tmp_path, capsys):
    merge.main(["--init", tiny_gpt2_dir, "--policies", runs[0], runs[1], "--out", str(tmp_path / "out")])
    init = weights(tiny_gpt2_dir)
    assert_same_weights(tmp_path / "out", merging.slerp(init, [weights(runs[0]), weights(runs[1])]))
    assert "mean cos Ω" in capsys.readouterr().out


def test_output_is_a_complete_checkpoint_with_the_init_tokenizer(tiny_gpt2_dir, runs, tmp_path):
    merge.main(["--init", tiny_gpt2_dir, "--policies", runs[0], runs[1], "--out", str(tmp_path / "out")])
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "config.json", "model.safetensors"):
        assert os.path.isfile(tmp_path / "out" / name), name
    with open(tmp_path / "out" / "vocab.json") as a, open(os.path.join(tiny_gpt2_dir, "vocab.json")) as b:
        assert a.read() == b.read()
    GPT2.from_pretrained(str(tmp_path / "out"))


def test_several_etas_write_one_folder_each_named_as_typed(tiny_gpt2_dir, runs, tmp_path):
    out = tmp_path / "sweep"
    merge.main(["--init", tiny_gpt2_dir, "--policies", *runs[:3], "--out", str(out), "--eta", "0", "0.5", "1.0"])
    assert sorted(os.listdir(out)) == ["eta_0", "eta_0.5", "eta_1.0"]
    init = weights(tiny_gpt2_dir)
    merged = merging.slerp(init, [weights(r) for r in runs[:3]])  # M = 3: the recursive SLERP
    for name, eta in (("eta_0", 0.0), ("eta_0.5", 0.5), ("eta_1.0", 1.0)):
        assert_same_weights(out / name, merging.liti(init, merged, eta))
    assert_same_weights(out / "eta_0", init)


def test_lerp_and_liti_base(tiny_gpt2_dir, runs, tmp_path):
    a, b, _, sft = runs
    merge.main(["--init", tiny_gpt2_dir, "--policies", a, b, "--out", str(tmp_path / "out"),
                "--method", "lerp", "--eta", "0.3", "--liti_base", sft])
    init = weights(tiny_gpt2_dir)
    merged = merging.lerp(init, [weights(a), weights(b)])
    assert_same_weights(tmp_path / "out", merging.liti(weights(sft), merged, 0.3))


def test_reads_unprefixed_bin_checkpoints(tiny_gpt2_dir, runs, tmp_path):
    """A policy saved as pytorch_model.bin with bare keys (openai-community/gpt2 style)."""
    bare = tmp_path / "bare"
    os.makedirs(bare)
    theta = weights(runs[0])
    torch.save({k.removeprefix("transformer."): v for k, v in theta.items()}, bare / "pytorch_model.bin")
    with open(os.path.join(runs[0], "config.json")) as src, open(bare / "config.json", "w") as dst:
        dst.write(src.read())
    merge.main(["--init", tiny_gpt2_dir, "--policies", str(bare), runs[1], "--out", str(tmp_path / "out")])
    init = weights(tiny_gpt2_dir)
    assert_same_weights(tmp_path / "out", merging.slerp(init, [theta, weights(runs[1])]))


def refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        merge.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and "error" in err
    return err


def test_mismatched_checkpoint_is_refused_and_nothing_written(tiny_gpt2_dir, runs, tmp_path, capsys):
    other = tmp_path / "other"
    config = GPT2Config(**{**vars(GPT2.from_pretrained(tiny_gpt2_dir).config), "n_layer": 3})
    save_policy(str(other), GPT2(config).hf_state_dict(), config, tiny_gpt2_dir)
    out = tmp_path / "out"
    err = refused(["--init", tiny_gpt2_dir, "--policies", runs[0], str(other), "--out", str(out),
                   "--eta", "0.5", "1"], capsys)
    assert "n_layer" in err and "same architecture" in err
    assert not out.exists()


def test_eta_out_of_range_is_refused_and_nothing_written(tiny_gpt2_dir, runs, tmp_path, capsys):
    out = tmp_path / "out"
    for bad in ("1.5", "-0.1", "nan", "half"):
        err = refused(["--init", tiny_gpt2_dir, "--policies", runs[0], runs[1], "--out", str(out),
                       "--eta", "0.5", bad], capsys)
        assert bad in err
    assert not out.exists()


def test_missing_checkpoint_and_output_over_an_input_are_refused(tiny_gpt2_dir, runs, tmp_path, capsys):
    err = refused(["--init", tiny_gpt2_dir, "--policies", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
                  capsys)
    assert "missing" in err
    before = weights(runs[0])
    refused(["--init", tiny_gpt2_dir, "--policies", runs[0], runs[1], "--out", runs[0]], capsys)
    assert_same_weights(runs[0], before)


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        merge.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--init", "--policies", "--out", "--method", "--eta", "--liti_base"):
        assert flag in out


def test_script_runs_from_the_repo_root(tiny_gpt2_dir, runs, tmp_path):
    run = subprocess.run([sys.executable, "merge.py", "--init", tiny_gpt2_dir, "--policies", runs[0], runs[1],
                          "--out", str(tmp_path / "out"), "--eta", "0.5"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert str(tmp_path / "out") in run.stdout
