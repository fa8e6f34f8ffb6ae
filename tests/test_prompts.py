"""Beyond IMDB: train.py and eval.py on a prompt file, rewarded by a classifier whose rewarded
label is not called POSITIVE; and eval.py scoring a job's checkpoints as the job trained them."""

import json
import os

import pytest
import torch

import eval as eval_script
import train
from conftest import wordpiece_folder
from nanowarp.data import DataError, load_prompt_file
from nanowarp.hub import CheckpointError
from nanowarp.reward import RewardModel
from nanowarp.tokenizer import load_tokenizer

PROMPTS = ["The soup tasted", "My neighbour's garden is", "Yesterday the train", "Honestly, this phone"]


@pytest.fixture(scope="module")
def emotion_dir(tmp_path_factory):
    """A random 3-label DistilBERT classifier: labels joy, anger, calm (none called POSITIVE)."""
    from nanowarp.models.distilbert import DistilBertClassifier, DistilBertConfig
    folder = wordpiece_folder(str(tmp_path_factory.mktemp("emotion")))
    vocab = open(os.path.join(folder, "vocab.txt"), encoding="utf-8").read().split("\n")
    torch.manual_seed(1)
    config = DistilBertConfig(vocab_size=len(vocab) - 1, max_position_embeddings=256, dim=32, n_layers=1, n_heads=4,
                              hidden_dim=64, pad_token_id=vocab.index("[PAD]"), num_labels=3,
                              id2label={0: "joy", 1: "anger", 2: "calm"})
    DistilBertClassifier(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompts")
    (folder / "prompts.txt").write_text("\n".join(PROMPTS[:2]) + "\n\n" + "\n".join(PROMPTS[2:]) + "\n")
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(PROMPTS)))
    return str(folder / "prompts.txt"), str(folder / "prompts.jsonl")


def test_prompt_files_text_and_jsonl(prompt_files, tiny_gpt2_dir):
    tokenizer = load_tokenizer(tiny_gpt2_dir)
    expected = [tokenizer.encode(p).ids for p in PROMPTS]
    assert load_prompt_file(prompt_files[0], tokenizer) == expected  # blank line skipped
    assert load_prompt_file(prompt_files[1], tokenizer) == expected


def test_bad_prompt_files_are_clear_errors(tmp_path, tiny_gpt2_dir):
    tokenizer = load_tokenizer(tiny_gpt2_dir)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: expected an object with a \"prompt\" string"):
        load_prompt_file(str(tmp_path / "bad.jsonl"), tokenizer)
    with pytest.raises(DataError, match="no prompt file at"):
        load_prompt_file(str(tmp_path / "missing.txt"), tokenizer)


def test_reward_label_chooses_the_rewarded_class(emotion_dir):
    texts = ["what a lovely day", "this is awful"]
    model = RewardModel(emotion_dir, label="calm")
    tokenizer = load_tokenizer(emotion_dir)
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(e.ids) for e in tokenizer.encode_batch(texts)],
                                          batch_first=True, padding_value=model.pad_id)
    probs = model.model(ids, (ids != model.pad_id).long()).softmax(-1)
    assert torch.allclose(RewardModel(emotion_dir, label="joy").score(texts), probs[:, 0], atol=1e-6)
    assert torch.allclose(RewardModel(emotion_dir, label="anger").score(texts), probs[:, 1], atol=1e-6)
    assert torch.allclose(RewardModel(emotion_dir, label="2").score(texts), probs[:, 2], atol=1e-6)  # by index
    with pytest.raises(CheckpointError, match=r"no label named like 'positive' \(its labels are 'joy', 'anger', "
                                              r"'calm'\): say which one is rewarded with --reward_label"):
        RewardModel(emotion_dir)  # no POSITIVE: refused, rather than rewarding the last class


def test_unknown_label_lists_the_labels(emotion_dir, tiny_gpt2_dir, prompt_files, tmp_path, capsys):
    code = train.main(["--policy", tiny_gpt2_dir, "--reward_model", emotion_dir, "--prompts", prompt_files[0],
                       "--reward_label", "POSITIVE", "--max_new_tokens", "8", "--out_dir", str(tmp_path),
                       "--device", "cpu"])
    assert code == 2
    assert "has no label 'POSITIVE'; its labels are 'joy', 'anger', 'calm'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def job(emotion_dir, tiny_gpt2_dir, prompt_files, tmp_path_factory):
    """WARP on a JSONL prompt file (no --data folder at all), rewarding the label 'joy'."""
    out = str(tmp_path_factory.mktemp("joy"))
    assert train.main(["--policy", tiny_gpt2_dir, "--reward_model", emotion_dir, "--prompts", prompt_files[1],
                       "--reward_label", "joy", "--data", "no/such/folder", "--iterations", "1", "--runs", "1",
                       "--steps", "2", "--batch_size", "4", "--max_new_tokens", "6", "--lora_rank", "2", "--lr", "1e-2",
                       "--temperature", "0.7", "--no_eos_penalty", "-2", "--log_completions", "1", "--device", "cpu",
                       "--out_dir", out]) == 0
    return out


def test_warp_on_a_prompt_file_with_another_classifier(job):
    rows = [json.loads(line) for line in open(os.path.join(job, "completions.jsonl"))]
    assert {r["prompt"] for r in rows} <= set(PROMPTS) and len(rows) == 2 * 4
    assert all(r["reward"] == -2.0 or 0 <= r["reward"] <= 1 for r in rows)


def test_eval_uses_the_jobs_settings_and_says_so(job, emotion_dir, tiny_gpt2_dir, prompt_files, tmp_path, capsys):
    out = str(tmp_path / "r.json")
    common = ["--models", os.path.join(job, "iter_1", "liti"), "--ref", tiny_gpt2_dir, "--reward_model", emotion_dir,
              "--prompts", prompt_files[0], "--max_new_tokens", "6", "--device", "cpu", "--plot", "none",
              "--samples", "3"]
    tensorboard = pytest.importorskip("tensorboard")
    eval_script.main(common + ["--out", out, "--report_to", "tensorboard"])
    row = json.load(open(out))[0]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tensorboard" / "eval")).Reload()
    assert [e.value for e in events.Scalars("reward")] == pytest.approx([row["reward"]])
    assert "completions/text_summary" in events.Tags()["tensors"]
    assert (row["temperature"], row["no_eos_penalty"], row["reward_kind"], row["reward_label"]) == (0.7, -2.0, "prob", "joy")
    assert "scored with its --temperature 0.7, --reward_kind prob, --no_eos_penalty -2.0, --reward_label joy" in \
        capsys.readouterr().out
    assert len(row["samples"]) == 3 and {s["prompt"] for s in row["samples"]} <= set(PROMPTS)
    assert row["n_prompts"] == len(PROMPTS)
    eval_script.main(common + ["--out", out, "--temperature", "1.0", "--reward_label", "anger"])  # flags win
    row = json.load(open(out))[0]
    assert (row["temperature"], row["reward_label"]) == (1.0, "anger")


def test_a_job_from_before_a_new_flag_resumes(job):
    """A job.json written before --prompts and --reward_label existed: the job ran with their defaults."""
    from nanowarp.config import parse_args
    from nanowarp.jobs.folder import start_job
    path = os.path.join(job, "job.json")
    settings = json.load(open(path))
    new = ("prompts", "reward_label")
    try:
        json.dump({k: v for k, v in settings.items() if k not in new}, open(path, "w"))
        cfg = parse_args([f"--{k}={v}" for k, v in settings.items() if k not in new and v is not None
                          and not isinstance(v, (bool, list))])
        start_job(cfg, log=lambda *a: None)  # no "holds a job with other settings"
    finally:
        json.dump(settings, open(path, "w"))
