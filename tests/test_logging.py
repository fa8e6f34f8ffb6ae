"""What a job shows while it runs: TensorBoard scalars and completions (read back from the event
files), OUT/completions.jsonl, model cards in every checkpoint, progress bars only on a terminal,
and a clear error for an integration that is not installed."""

import io
import json
import os
import sys

import pytest
import torch

import merge
import train
from nanowarp import logger as logger_module
from nanowarp.config import parse_args, validate

STEPS = 3


@pytest.fixture(scope="module")
def flags(tiny_gpt2_dir, tiny_reward_dir, prepared_imdb_dir):
    return ["--policy", tiny_gpt2_dir, "--reward_model", tiny_reward_dir, "--data", prepared_imdb_dir,
            "--iterations", "1", "--runs", "2", "--steps", str(STEPS), "--batch_size", "4", "--max_new_tokens", "8",
            "--lora_rank", "2", "--warmup", "1", "--lr", "1e-2", "--device", "cpu"]


@pytest.fixture(scope="module")
def job(flags, tmp_path_factory):
    pytest.importorskip("tensorboard")
    out = str(tmp_path_factory.mktemp("logged"))
    assert train.main(flags + ["--out_dir", out, "--report_to", "tensorboard", "--log_completions", "2"]) == 0
    return out


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_tensorboard_scalars_are_the_metrics(job):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    rows = metrics(job)
    for m in (0, 1):
        events = EventAccumulator(os.path.join(job, "tensorboard", "iter_1", f"run_{m}")).Reload()
        tags = set(events.Tags()["scalars"])
        run_rows = [r for r in rows if r["run"] == m]
        assert tags == set(run_rows[0]) - {"iteration", "run", "step"}  # metrics.jsonl's names; step is the x axis
        for name in ("reward", "kl", "loss", "lr"):
            logged = [(e.step, e.value) for e in events.Scalars(name)]
            assert [s for s, _ in logged] == [1, 2, 3]
            assert [v for _, v in logged] == pytest.approx([r[name] for r in run_rows], rel=1e-6)
        assert "completions/text_summary" in events.Tags()["tensors"]  # the text table, every --log_completions steps


def test_completions_jsonl_rows(job, prepared_imdb_dir, tiny_gpt2_dir):
    from nanowarp.data import load_prompts
    from nanowarp.tokenizer import load_tokenizer
    rows = [json.loads(line) for line in open(os.path.join(job, "completions.jsonl"))]
    assert len(rows) == 2 * 4  # step 2 of each run (STEPS = 3), a handful (4) of the batch of 4
    assert {(r["iteration"], r["run"], r["step"]) for r in rows} == {(1, 0, 2), (1, 1, 2)}
    tokenizer = load_tokenizer(tiny_gpt2_dir)
    prompts = set(tokenizer.decode_batch(load_prompts(prepared_imdb_dir, "train")))
    for r in rows:
        assert set(r) == {"iteration", "run", "step", "prompt", "completion", "reward", "kl"}
        assert r["prompt"] in prompts  # a prompt of the batch, as text
        assert isinstance(r["completion"], str)
        assert r["reward"] == -1.0 or 0 <= r["reward"] <= 1  # P(positive), or -1 without EOS


def test_every_checkpoint_has_a_model_card(job, tiny_gpt2_dir):
    rows = metrics(job)
    for name in ("run_0", "run_1", "slerp", "liti"):
        card = open(os.path.join(job, "iter_1", name, "README.md"), encoding="utf-8").read()
        assert card.startswith("---\nlibrary_name: nanowarp\n")
        assert f"# nanowarp WARP: {os.path.basename(job)}/iter_1/{name}" in card
        assert f"Base model: `{tiny_gpt2_dir}`" in card
        assert "| `--lr` | `0.01` |" in card and "| `--report_to` | `tensorboard` |" in card
        assert "## Final training metrics" in card
    last = [r for r in rows if r["step"] == STEPS]
    card = open(os.path.join(job, "iter_1", "run_1", "README.md"), encoding="utf-8").read()
    assert "Run 2 of 2 of WARP iteration 1" in card and f"| {last[1]['reward']:.4g} |" in card
    assert "LITI (1 − η) θ_init + η θ_slerp, η = 0.5" in open(os.path.join(job, "iter_1", "liti", "README.md")).read()


def test_merge_writes_a_model_card(job, tmp_path):
    out = tmp_path / "merged"
    merge.main(["--init", os.path.join(job, "iter_1", "slerp"), "--policies", os.path.join(job, "iter_1", "run_0"),
                os.path.join(job, "iter_1", "run_1"), "--out", str(out), "--eta", "0.5"])  # in this process
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "# nanowarp merge:" in card and "with η = 0.5" in card and "mean_cos_task_vectors" in card


def test_missing_integration_names_the_pip_install(flags, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ValueError, match="--report_to wandb needs the wandb package: pip install wandb"):
        validate(parse_args(flags + ["--out_dir", str(tmp_path), "--report_to", "wandb"]))


def test_wandb_offline(flags, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is the optional `wandb` extra, not a test dependency (it is large and "
                                  "network-minded); this test runs where it is installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = str(tmp_path / "job")
    assert train.main(flags + ["--out_dir", out, "--runs", "1", "--steps", "1", "--report_to", "wandb"]) == 0
    assert any(name.startswith("offline-run") for name in os.listdir(os.path.join(out, "wandb")))


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("tty", [False, True])
def test_progress_bars_only_on_a_terminal(monkeypatch, tty):
    stream = Terminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    assert list(logger_module.progress(range(3), "counting")) == [0, 1, 2]
    assert ("counting" in stream.getvalue()) == tty


def test_reward_stage_saves_before_scoring_and_limits_the_reviews(tiny_reward_dir, prepared_imdb_dir, tmp_path,
                                                                   monkeypatch):
    import nanowarp.supervised as supervised
    scored = []

    def accuracy(model, tokenizer, texts, labels, device):
        assert os.path.isfile(tmp_path / "reward_model" / "config.json"), "the model is saved before scoring"
        scored.append(len(texts))
        return 0.5

    monkeypatch.setattr(supervised, "accuracy", accuracy)
    cfg = parse_args(["--stage", "reward", "--reward_base", tiny_reward_dir, "--data", prepared_imdb_dir,
                      "--out_dir", str(tmp_path), "--epochs", "0.5", "--train_batch_size", "4", "--test_limit", "5"])
    lines = []
    supervised.train_reward_model(cfg, torch.device("cpu"), log=lines.append)
    assert scored == [5]
    assert any("scoring 5 test reviews" in line for line in lines)
    card = (tmp_path / "reward_model" / "README.md").read_text(encoding="utf-8")
    assert "| 0.5 | 5 |" in card and f"Base model: `{tiny_reward_dir}`" in card
