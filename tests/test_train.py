"""train.py end to end on tiny models: the policy moves, the M runs differ, every checkpoint and
the metrics are written, eval.py reads them; and bad input stops it before anything is written."""

import json
import os

import pytest
import torch

import train
from conftest import in_process
from nanowarp import merging
from nanowarp.merging import task_vector
from nanowarp.models.gpt2 import GPT2



@pytest.fixture(scope="module")
def flags(tiny_gpt2_dir, tiny_reward_dir, prepared_imdb_dir):
    return ["--policy", tiny_gpt2_dir, "--reward_model", tiny_reward_dir, "--data", prepared_imdb_dir,
            "--iterations", "2", "--runs", "2", "--steps", "3", "--batch_size", "4", "--max_new_tokens", "8",
            "--lora_rank", "2", "--warmup", "1", "--lr", "1e-2", "--device", "cpu"]


@pytest.fixture(scope="module")
def job(flags, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("job"))
    assert train.main(flags + ["--out_dir", out]) == 0
    return out


def weights(folder):
    return GPT2.from_pretrained(folder).hf_state_dict()


def test_every_checkpoint_and_the_metrics_are_written(job):
    for i in (1, 2):
        for name in ("run_0", "run_1", "slerp", "liti"):
            folder = os.path.join(job, f"iter_{i}", name)
            assert os.path.isfile(os.path.join(folder, "model.safetensors")), folder
            assert os.path.isfile(os.path.join(folder, "vocab.json")), "checkpoints carry the tokenizer"
    rows = [json.loads(line) for line in open(os.path.join(job, "metrics.jsonl"))]
    assert len(rows) == 2 * 2 * 3
    for key in ("reward", "kl", "r_beta", "length", "finished", "lr", "grad_norm", "tokens_per_s"):
        assert all(key in r for r in rows), key
    assert {(r["iteration"], r["run"]) for r in rows} == {(1, 0), (1, 1), (2, 0), (2, 1)}
    for r in rows:  # the update's split adds up to it
        split = r["time_anchor"] + r["time_policy"] + r["time_optimizer"] + r["time_ema"]
        assert min(r[k] for k in ("time_anchor", "time_policy", "time_optimizer", "time_ema")) >= 0
        assert abs(split - r["time_update"]) <= 1e-6, r


def test_policy_moves_and_runs_differ(job, tiny_gpt2_dir):
    sft = weights(tiny_gpt2_dir)
    d1 = task_vector(sft, weights(os.path.join(job, "iter_1", "run_0")))
    d2 = task_vector(sft, weights(os.path.join(job, "iter_1", "run_1")))
    flat1 = torch.cat([v.flatten() for v in d1.values()])
    flat2 = torch.cat([v.flatten() for v in d2.values()])
    assert flat1.norm() > 0 and flat2.norm() > 0, "the task vectors must not be zero"
    cos = torch.dot(flat1, flat2) / (flat1.norm() * flat2.norm())
    assert cos < 1 - 1e-4, "two runs with distinct seeds must differ (angle > 0)"
    # iteration 2 starts from iteration 1's LITI, not from the SFT model
    liti1 = weights(os.path.join(job, "iter_1", "liti"))
    d_iter2 = task_vector(liti1, weights(os.path.join(job, "iter_2", "run_0")))
    assert any(v.abs().max() > 0 for v in d_iter2.values())


def test_liti_is_halfway_between_init_and_slerp(job, tiny_gpt2_dir):
    sft, slerp, liti = (weights(p) for p in (tiny_gpt2_dir, os.path.join(job, "iter_1", "slerp"),
                                                 os.path.join(job, "iter_1", "liti")))
    for k in sft:
        assert torch.allclose(liti[k], 0.5 * sft[k] + 0.5 * slerp[k], atol=1e-6), k


def test_same_seed_same_result(flags, job, tmp_path):
    # run 0 of iteration 1 has the same seed and θ_init in a one-run job
    assert train.main(flags + ["--out_dir", str(tmp_path), "--iterations", "1", "--runs", "1"]) == 0
    a, b = weights(os.path.join(job, "iter_1", "run_0")), weights(str(tmp_path / "iter_1" / "run_0"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_reads_the_checkpoints(job, tiny_gpt2_dir, tiny_reward_dir, prepared_imdb_dir, tmp_path):
    out = tmp_path / "results.json"
    import eval as eval_cli  # run here: a process start spared (scripts run from the root: test_merge_cli.py)
    argv = ["--models", os.path.join(job, "iter_2", "liti"), os.path.join(job, "iter_2", "slerp"), "--ref", tiny_gpt2_dir,
            "--reward_model", tiny_reward_dir, "--data", prepared_imdb_dir, "--n_prompts", "4", "--seed", "0",
            "--out", str(out), "--max_new_tokens", "8", "--device", "cpu"]
    in_process(eval_cli.main, argv)
    rows = json.loads(out.read_text())
    assert len(rows) == 2 and all({"model", "kl", "reward", "finished"} <= set(r) for r in rows)


@pytest.mark.parametrize("bad, message", [
    (["--liti_rate", "1.5"], "--liti_rate"),
    (["--liti_rate", "-0.1"], "--liti_rate"),
    (["--runs", "0"], "--runs"),
    (["--ema_rate", "0"], "--ema_rate"),
    (["--ema_rate", "1.01"], "--ema_rate"),
    (["--batch_size", "6", "--rloo_k", "4"], "--batch_size"),
])
def test_bad_hyperparameters_are_refused_before_writing(flags, bad, message, tmp_path, capsys):
    sentinel = tmp_path / "metrics.jsonl"
    sentinel.write_text("keep me\n")
    assert train.main(flags + ["--out_dir", str(tmp_path)] + bad) != 0
    assert message in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"] and sentinel.read_text() == "keep me\n"


def test_missing_data_folder_is_a_clear_error(flags, tmp_path, capsys):
    assert train.main(flags + ["--out_dir", str(tmp_path / "out"), "--data", str(tmp_path / "nope")]) != 0
    assert "prepare.py" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_reward_model_with_one_label_is_a_scalar_reward_model(tiny_reward_dir, tmp_path):
    """One label (TRL's and OpenRLHF's reward models): the reward is its logit, whatever --reward_kind
    (before, such a model was refused; tests/test_rewards.py checks transformers-written ones)."""
    import shutil
    from nanowarp.models.distilbert import DistilBertClassifier
    from nanowarp.reward import RewardModel
    one = tmp_path / "rm1"
    shutil.copytree(tiny_reward_dir, one)
    model = DistilBertClassifier.from_pretrained(str(one)).eval()
    model.config.num_labels, model.config.id2label = 1, {0: "LABEL_0"}
    model.classifier = torch.nn.Linear(model.config.dim, 1)
    model.save_pretrained(str(one))
    reward_model, texts = RewardModel(str(one)), ["A fine film.", "Dull."]
    ids = [e.ids for e in reward_model.tokenizer.encode_batch(texts)]
    with torch.no_grad():
        expected = [model(torch.tensor([i]))[0, 0].item() for i in ids]
    assert reward_model.score(texts).tolist() == pytest.approx(expected, abs=1e-5)


def test_presets_set_defaults_and_explicit_flags_win():
    from nanowarp.config import PRESETS, Config, parse_args
    base = parse_args([])
    for name, overrides in PRESETS.items():
        cfg = parse_args(["--preset", name])
        for key, value in vars(base).items():
            assert getattr(cfg, key) == overrides.get(key, value if key != "preset" else name), (name, key)
    assert set(PRESETS["tiny"]) <= {f for f in Config.__dataclass_fields__}
    cfg = parse_args(["--preset", "tiny", "--steps", "7"])
    assert cfg.steps == 7 and cfg.lora_rank == 8  # the flag beats the preset; the rest of the preset stays
    with pytest.raises(SystemExit):
        parse_args(["--preset", "nope"])


def test_command_line_gives_back_the_config():
    import shlex
    from nanowarp.config import PRESETS, Config, command_line, parse_args
    cfg = Config(policy="runs/my sft", out_dir="runs/x", fresh=True, whiten=False, **PRESETS["tiny"])
    command = command_line(cfg, "train.py")
    assert command.startswith("python train.py ") and "--fresh" in command and "--runs" not in command  # a default
    assert parse_args(shlex.split(command)[2:]) == cfg


# ---- the flags that change the algorithm, each run end to end: a flag that did nothing fails here ----

def test_merge_lerp_averages_the_runs_instead_of_slerp(flags, job, tiny_gpt2_dir, tmp_path):
    out = str(tmp_path / "lerp")
    assert train.main(flags + ["--out_dir", out, "--iterations", "1", "--merge", "lerp"]) == 0
    sft = weights(tiny_gpt2_dir)
    runs = [weights(os.path.join(out, "iter_1", f"run_{m}")) for m in (0, 1)]
    for m in (0, 1):  # the same runs as the SLERP job's: only the merge differs
        same = weights(os.path.join(job, "iter_1", f"run_{m}"))
        assert all(torch.equal(runs[m][k], same[k]) for k in same)
    merged = weights(os.path.join(out, "iter_1", "slerp"))
    lerp, slerp = merging.lerp(sft, runs), merging.slerp(sft, runs)
    assert all(torch.allclose(merged[k], lerp[k], rtol=0, atol=1e-6) for k in sft)
    assert any(not torch.allclose(merged[k], slerp[k], rtol=0, atol=1e-6) for k in sft), "lerp must not be SLERP"


def test_whiten_changes_the_step_to_the_whitened_advantages(flags, job, tmp_path):
    # the same run as the job's run 0 of iteration 1 but for --whiten (test_objective pins its formula)
    out = str(tmp_path / "whiten")
    assert train.main(flags + ["--out_dir", out, "--iterations", "1", "--runs", "1", "--whiten"]) == 0
    a, b = weights(os.path.join(job, "iter_1", "run_0")), weights(os.path.join(out, "iter_1", "run_0"))
    assert any(not torch.equal(a[k], b[k]) for k in a), "--whiten must change the run"
    first = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][0]
    reference = [json.loads(line) for line in open(os.path.join(job, "metrics.jsonl"))][0]
    assert first["reward"] == reference["reward"], "the first step samples and scores the same completions"
    assert first["loss"] != reference["loss"]


@pytest.fixture(scope="module")
def ending_policy_dir(tiny_gpt2_dir, tmp_path_factory):
    """The tiny policy with 60 stop ids (generation_config.json): about half its completions end."""
    import shutil
    folder = str(tmp_path_factory.mktemp("ending"))
    shutil.copytree(tiny_gpt2_dir, folder, dirs_exist_ok=True)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": list(range(60))}, f)
    return folder


@pytest.mark.parametrize("kind", ["prob", "logit"])
def test_reward_kind_rewards_the_probability_or_the_logit(flags, ending_policy_dir, tiny_reward_dir, kind, tmp_path):
    from nanowarp.models.distilbert import DistilBertClassifier
    from nanowarp.tokenizer import load_tokenizer
    out = str(tmp_path / kind)
    assert train.main(flags + ["--out_dir", out, "--policy", ending_policy_dir, "--iterations", "1", "--runs", "1",
                               "--steps", "1", "--batch_size", "8", "--log_completions", "1",
                               "--no_eos_penalty", "-7", "--reward_kind", kind]) == 0
    rows = [json.loads(line) for line in open(os.path.join(out, "completions.jsonl"))]
    finished = [r for r in rows if r["reward"] != -7]
    assert 0 < len(finished) < len(rows), "the check needs rows that ended and rows that did not"
    classifier, tokenizer = DistilBertClassifier.from_pretrained(tiny_reward_dir).eval(), load_tokenizer(tiny_reward_dir)
    for r in finished:  # the classifier read by hand: POSITIVE's logit, or its softmax probability
        ids = torch.tensor([tokenizer.encode(r["prompt"] + r["completion"]).ids])
        logits = classifier(ids, torch.ones_like(ids)).double()[0]
        expected = logits[1] if kind == "logit" else logits.softmax(-1)[1]
        assert abs(r["reward"] - expected.item()) < 1e-5, (r, logits)
