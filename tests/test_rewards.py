"""The reward interface (nanowarp/reward.py): reward models of every layout, reward functions reading
the prompt rows' columns, weighted together (reward servers: test_serve_reward.py); a failing function
stops the job with exit 2 and a rerun resumes; a learnable keyword reward rises under RL."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import train
from conftest import REVIEWS, ROOT, assert_same_weights, final_weights, in_process, wordpiece_folder
from nanowarp import hub
from nanowarp.config import parse_args
from nanowarp.hub import CheckpointError
from nanowarp.models import load_theta
from nanowarp.models.distilbert import DistilBertClassifier, DistilBertConfig
from nanowarp.models.gpt2 import GPT2, GPT2Config
from nanowarp.padding import right_pad
from nanowarp.reward import Reward, RewardError, RewardFunction, RewardModel, Texts
from nanowarp.rl import load_resources, rl_run
from nanowarp.tokenizer import EOS, load_tokenizer
from nanowarp.warp import warp

EXAMPLES = os.path.join(ROOT, "examples", "rewards", "rewards.py")
KEYWORD = EXAMPLES + ":keyword_reward"
KEYWORDS = ["e", "a"]  # the `keyword` column of the tests' prompts: row i's is KEYWORDS[i % 2]


def load_with_columns(cfg, device=None):
    """rl.load_resources, --data's prompts given a `keyword` column, for rl_run called here (a job reads
    its columns from a prompt file: keyword_prompts)."""
    resources = load_resources(cfg, device)
    return dataclasses.replace(resources, columns={"keyword": [KEYWORDS[i % 2] for i in range(len(resources.prompts))]})


@pytest.fixture(scope="session")
def keyword_prompts(tmp_path_factory):
    """A prompt file as users keep one: each row a prompt and the `keyword` column the reward function
    reads, which every worker process and torchrun rank loads with the prompts."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rows = [dict(prompt=" ".join(review.split()[:4]), keyword=KEYWORDS[i % 2]) for i, review in enumerate(REVIEWS)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


# ---- reward models ------------------------------------------------------------------------------

def classifier_dir(folder, id2label, problem_type=None):
    """A random DistilBERT classifier with these labels (and config.json's problem_type)."""
    folder = wordpiece_folder(str(folder))
    vocab = open(os.path.join(folder, "vocab.txt"), encoding="utf-8").read().split("\n")
    torch.manual_seed(0)
    DistilBertClassifier(DistilBertConfig(vocab_size=len(vocab), max_position_embeddings=128, dim=32, n_layers=1,
                                          n_heads=4, hidden_dim=64, pad_token_id=vocab.index("[PAD]"),
                                          num_labels=len(id2label), id2label=id2label)).save_pretrained(folder)
    if problem_type:
        config = hub.load_config(folder)
        hub.write_json(os.path.join(folder, "config.json"), {**config, "problem_type": problem_type})
    return folder


def logits_of(reward_model, texts):
    enc = reward_model.tokenizer.encode_batch(texts)
    ids, mask = right_pad([e.ids for e in enc], reward_model.pad_id)
    return ids, mask, reward_model.model(ids, mask)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_a_scalar_reward_model_written_by_transformers_gives_its_logit(family, bpe_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    vocab = json.load(open(os.path.join(bpe_dir, "vocab.json")))
    ids = dict(pad_token_id=vocab[EOS], bos_token_id=vocab[EOS], eos_token_id=vocab[EOS], num_labels=1)
    torch.manual_seed(0)
    if family == "gpt2":
        model = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
            vocab_size=len(vocab), n_positions=128, n_embd=16, n_layer=1, n_head=2, **ids))
    else:
        name = {"llama": "Llama", "qwen2": "Qwen2"}[family]
        config = getattr(transformers, f"{name}Config")(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, **ids)
        model = getattr(transformers, f"{name}ForSequenceClassification")(config)
    folder = str(tmp_path / family)
    shutil.copytree(bpe_dir, folder)
    model.eval().save_pretrained(folder)
    reward_model = RewardModel(folder)
    texts = REVIEWS[:5]
    ids, mask = right_pad([e.ids for e in load_tokenizer(folder).encode_batch(texts)], reward_model.pad_id)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits[:, 0]
    assert (reward_model.score(texts) - expected).abs().max() <= 1e-5


def test_a_classifier_without_a_positive_label_is_refused_naming_its_labels(tmp_path, tiny_gpt2_dir,
                                                                             prepared_imdb_dir, capsys):
    folder = classifier_dir(tmp_path / "toxicity", {0: "non-toxic", 1: "toxic"})
    with pytest.raises(CheckpointError, match=r"no label named like 'positive' \(its labels are 'non-toxic', "
                                              r"'toxic'\): say which one is rewarded with --reward_label"):
        RewardModel(folder)
    code = in_process(train.main, ["--policy", tiny_gpt2_dir, "--reward_model", folder, "--data", prepared_imdb_dir,
                                   "--out_dir", str(tmp_path / "job"), "--device", "cpu", "--max_new_tokens", "8"])
    assert code == 2 and "'non-toxic', 'toxic'" in capsys.readouterr().err
    texts = REVIEWS[:3]
    probs = logits_of(RewardModel(folder, label="non-toxic"), texts)[2].softmax(-1)
    assert torch.allclose(RewardModel(folder, label="non-toxic").score(texts), probs[:, 0], atol=1e-6)
    assert torch.allclose(RewardModel(folder, label="1").score(texts), probs[:, 1], atol=1e-6)  # by index


def test_a_multi_label_classifier_gets_a_sigmoid(tmp_path):
    folder = classifier_dir(tmp_path / "multi", {0: "funny", 1: "positive", 2: "long"}, "multi_label_classification")
    model, texts = RewardModel(folder), REVIEWS[:4]
    logits = logits_of(model, texts)[2]
    assert torch.allclose(model.score(texts), logits[:, 1].sigmoid(), atol=1e-6)
    assert not torch.allclose(model.score(texts), logits.softmax(-1)[:, 1], atol=1e-3)
    assert torch.allclose(RewardModel(folder, kind="logit").score(texts), logits[:, 1], atol=1e-6)


# ---- reward functions and weights ---------------------------------------------------------------

TEXTS = Texts(prompts=["A film", "The plot", "It"], completions=[" was a fine film", " was bad", " was great fun"],
              queries=["A film was a fine film", "The plot was bad", "It was great fun"])
COLUMNS = {"keyword": ["fine", "good", "FUN"]}


def test_weights_combine_the_sources_each_kept_and_the_eos_rule_applies_once():
    keyword, length = RewardFunction(KEYWORD), RewardFunction(EXAMPLES + ":length_reward")
    finished = torch.tensor([True, True, False])
    rewards, parts = Reward([keyword, length], [2.0, 0.5], -1.0).score(TEXTS, finished, COLUMNS)
    assert parts["keyword_reward"].tolist() == [1.0, 0.0, 1.0]  # the column, row by row; case aside
    words = torch.tensor([4, 2, 3]).float()
    assert torch.allclose(parts["length_reward"], 1 - (words - 20).abs() / 20)
    assert rewards.tolist() == [(2 * parts["keyword_reward"] + 0.5 * parts["length_reward"])[i].item()
                                for i in (0, 1)] + [-1.0]
    unpenalised, _ = Reward([keyword, length], [2.0, 0.5], None).score(TEXTS, finished, COLUMNS)  # penalty none
    assert unpenalised[2] == 2 * 1.0 + 0.5 * parts["length_reward"][2]
    with pytest.raises(ValueError, match="--reward_weights has 1 value for 2 reward sources"):
        Reward([keyword, length], [1.0])


def write_function(folder, body, name="bad"):
    path = os.path.join(folder, f"{name}.py")
    with open(path, "w") as f:
        f.write(f"def {name}(prompts, completions, keyword, **columns):\n    {body}\n")
    return RewardFunction(f"{path}:{name}")


@pytest.mark.parametrize("body, message", [
    ("raise KeyError('no such word')", r"raised KeyError: 'no such word', on a batch of 3 completions whose first is "
                                       r"row 0 \(prompt 'A film', completion ' was a fine film', keyword 'fine'\)"),
    ("return [1.0, 2.0]", r"returned 2 rewards for 3 completions \(the first: row 0"),
    ("return [1.0, float('nan'), 0.0]", r"returned nan at row 1 \(prompt 'The plot', completion ' was bad', "
                                        r"keyword 'good'\): a reward must be a finite number"),
    ("return [1.0, 'high', 0.0]", r"returned 'high' at row 1"),
], ids=["raises", "wrong-count", "nan", "not-a-number"])
def test_a_bad_reward_function_is_named_with_its_first_bad_row(tmp_path, body, message):
    fn = write_function(str(tmp_path), body)
    with pytest.raises(RewardError, match=rf"the reward function .*bad\.py:bad {message}"):
        Reward([fn]).score(TEXTS, None, COLUMNS)


def test_reward_fn_specs_are_checked(tmp_path):
    (tmp_path / "f.py").write_text("x = 1\n")
    for spec, message in [("f.py", "expected FILE.py:NAME"), (str(tmp_path / "g.py:f"), "no file"),
                          (str(tmp_path / "f.py:f"), "defines no function 'f'")]:
        with pytest.raises(ValueError, match=message):
            RewardFunction(spec)


# ---- the tiny job with a reward model and a keyword function: logged, and the same everywhere -----

def reward_flags(job_flags, prompts, *source):
    """The tiny job (conftest.job_flags: its reward model) on the prompts of keyword_prompts, plus a
    second source weighted 0.5, without the −1 rule (its random policy never ends a completion: every
    reward would be −1)."""
    return job_flags + ["--prompts", prompts, *source, "--reward_weights", "1", "0.5", "--no_eos_penalty", "none"]


@pytest.fixture(scope="session")
def reward_job(job_flags, keyword_prompts, tmp_path_factory):
    """The tiny job rewarded by its reward model + 0.5 × the keyword function, run sequentially here."""
    out = str(tmp_path_factory.mktemp("reward_job"))
    in_process(warp, parse_args(reward_flags(job_flags, keyword_prompts, "--reward_fn", KEYWORD) + ["--out_dir", out]),
               None, lambda *a: None)
    return out


def test_each_source_is_logged_and_the_reward_combines_them(reward_job, reference):
    rows = [json.loads(line) for line in open(os.path.join(reward_job, "metrics.jsonl"))]
    assert all({"reward/model", "reward/keyword_reward"} <= row.keys() for row in rows)
    assert any(0 < row["reward/keyword_reward"] for row in rows)
    assert all(row["reward"] == pytest.approx(row["reward/model"] + 0.5 * row["reward/keyword_reward"], abs=1e-6)
               for row in rows)
    theta = final_weights(reward_job)
    assert any(not torch.equal(theta[k], reference[k]) for k in theta)  # the keyword reward changed the job


def test_two_workers_give_the_sequential_weights_with_a_reward_function(job_flags, keyword_prompts, reward_job, tmp_path):
    flags = reward_flags(job_flags, keyword_prompts, "--reward_fn", KEYWORD) + ["--out_dir", str(tmp_path), "--workers", "2"]
    in_process(warp, parse_args(flags), None, lambda *a: None)
    assert_same_weights(final_weights(str(tmp_path)), final_weights(reward_job))


def test_torchrun_ranks_give_the_sequential_weights_with_a_reward_function(job_flags, keyword_prompts, reward_job,
                                                                        tmp_path):
    out = str(tmp_path / "job")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", os.path.join(ROOT, "train.py"),
           *reward_flags(job_flags, keyword_prompts, "--reward_fn", KEYWORD), "--out_dir", out]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert_same_weights(final_weights(out), final_weights(reward_job))
    assert done.stdout.count("iter 2: merged") == 1  # only rank 0 logs


FLAKY = """import os
CALLS = [0]
def flaky(prompts, completions, keyword, **columns):
    CALLS[0] += 1
    values = [float(k.lower() in c.lower()) for c, k in zip(completions, keyword)]  # keyword_reward's
    if CALLS[0] == int(os.environ.get("FLAKY_AT", "0")):
        kind = os.environ["FLAKY_KIND"]
        if kind == "raise":
            raise RuntimeError("the checker crashed")
        return values[:-1] if kind == "count" else values[:1] + [float("nan")] + values[2:]
    return values
"""


@pytest.mark.parametrize("kind, message", [("raise", "raised RuntimeError: the checker crashed"),
                                           ("count", "returned 3 rewards for 4 completions"),
                                           ("nan", "returned nan at row 1")])
def test_a_failing_reward_function_stops_the_job_and_a_rerun_resumes(job_flags, keyword_prompts, reward_job, tmp_path,
                                                                     monkeypatch, capsys, kind, message):
    (tmp_path / "flaky.py").write_text(FLAKY)
    out = str(tmp_path / "job")
    flags = reward_flags(job_flags, keyword_prompts, "--reward_fn", f"{tmp_path / 'flaky.py'}:flaky") + ["--out_dir", out]
    monkeypatch.setenv("FLAKY_KIND", kind)
    monkeypatch.setenv("FLAKY_AT", "5")  # step 2 of iter_1/run_1: run 0 is done
    assert in_process(train.main, flags) == 2
    err = capsys.readouterr().err
    assert f"train.py: error: iter_1/run_1: the reward function {tmp_path / 'flaky.py'}:flaky {message}" in err
    assert os.path.isfile(os.path.join(out, "iter_1", "run_0", "config.json"))  # the finished run is kept
    monkeypatch.delenv("FLAKY_AT")
    assert in_process(train.main, flags) == 0
    assert "resuming the job" in capsys.readouterr().out
    assert_same_weights(final_weights(out), final_weights(reward_job))


# ---- eval.py and sample.py score through the same Reward --------------------------------------------

def test_eval_and_sample_take_reward_functions(tiny_gpt2_dir, prepared_imdb_dir, tmp_path, capsys):
    import eval as eval_cli
    import sample as sample_cli
    length = EXAMPLES + ":length_reward"
    sample_cli.main(["--model", tiny_gpt2_dir, "--prompt", "This movie was", "--num_samples", "3", "--max_new_tokens",
                     "6", "--device", "cpu", "--reward_fn", length, "--no_eos_penalty", "none", "--json"])
    rows = json.loads(capsys.readouterr().out)["prompts"][0]["models"][0]["samples"]
    assert [r["reward"] for r in rows] == pytest.approx(sample_module_length([r["completion"] for r in rows]))
    out = str(tmp_path / "results.json")
    eval_cli.main(["--models", tiny_gpt2_dir, "--ref", tiny_gpt2_dir, "--data", prepared_imdb_dir, "--n_prompts", "3",
                   "--max_new_tokens", "6", "--device", "cpu", "--reward_fn", length, "--reward_weights", "2",
                   "--no_eos_penalty", "none", "--samples", "3", "--out", out, "--plot", "none"])
    row = json.load(open(out))[0]
    expected = [2 * r for r in sample_module_length([s["completion"] for s in row["samples"]])]
    assert [s["reward"] for s in row["samples"]] == pytest.approx(expected)
    assert row["reward"] == pytest.approx(sum(expected) / 3)


def sample_module_length(completions):
    """examples/rewards/rewards.py:length_reward, loaded by path."""
    return RewardFunction(EXAMPLES + ":length_reward")(Texts([""] * len(completions), completions, completions), {})


# ---- a learnable reward rises: the loss and the KL penalty have the right sign ------------------

@pytest.fixture(scope="module")
def learnable_policy(bpe_dir, tmp_path_factory):
    """A random GPT-2 whose embeddings (tied to its LM head) are 15 times larger than at initialisation:
    peaked enough next-token distributions for a LoRA to move within a few steps."""
    folder = str(tmp_path_factory.mktemp("learnable"))
    shutil.copytree(bpe_dir, folder, dirs_exist_ok=True)
    vocab = json.load(open(os.path.join(bpe_dir, "vocab.json")))
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=len(vocab), n_positions=128, n_embd=32, n_layer=2, n_head=4,
                            bos_token_id=vocab[EOS], eos_token_id=vocab[EOS]))
    with torch.no_grad():
        model.transformer.wte.weight.mul_(15)
    model.save_pretrained(folder)
    return folder


NO_KEYWORD = """def no_keyword(prompts, completions, keyword, **columns):
    return [float(k.lower() not in c.lower()) for c, k in zip(completions, keyword)]  # 1 - keyword_reward
"""


def keyword_rates(policy, data, fn, extra):
    """The keyword rate (fraction of completions holding their row's keyword) at each step of a short
    RL run rewarded by fn (the keyword reward, or its opposite)."""
    cfg = parse_args(["--policy", policy, "--reward_fn", fn, "--data", data, "--steps", "30", "--batch_size", "16",
                      "--max_new_tokens", "8", "--lora_rank", "4", "--lr", "1e-2", "--warmup", "0", "--kl_coef", "0.1",
                      "--no_eos_penalty", "none", "--device", "cpu", *extra])
    rows = []
    rl_run(load_theta(policy), 0, 0, cfg, load_with_columns(cfg), log=rows.append)
    reward = [row["reward"] for row in rows]
    return reward if fn == KEYWORD else [1 - r for r in reward]


@pytest.mark.parametrize("extra", [["--whiten"], ["--rloo_k", "4"]], ids=["reinforce", "rloo"])
def test_a_keyword_reward_rises(learnable_policy, prepared_imdb_dir, tmp_path, extra):
    """The keyword rate rises under the keyword reward (REINFORCE with whitened advantages, and RLOO),
    and ends well above where the opposite reward (its absence rewarded) takes it from the same start:
    what the sign of the loss decides (flipped, the two runs swap and this fails). A bare rise would not
    do: a policy that grows less random writes more common letters under any reward. (The KL penalty's
    sign is too small a force here to show; test_objective checks it against the paper's gradient.)"""
    (tmp_path / "opposite.py").write_text(NO_KEYWORD)
    rewarded = keyword_rates(learnable_policy, prepared_imdb_dir, KEYWORD, extra)
    opposite = keyword_rates(learnable_policy, prepared_imdb_dir, f"{tmp_path / 'opposite.py'}:no_keyword", extra)
    mean = lambda rates: sum(rates) / len(rates)  # noqa: E731
    assert mean(rewarded[-5:]) > mean(rewarded[:5]) + 0.2, rewarded
    assert mean(rewarded[-5:]) > mean(opposite[-5:]) + 0.3, (rewarded, opposite)


def test_the_keyword_example_runs_from_its_prompt_file(tiny_gpt2_dir, tmp_path, capsys):
    # examples/rewards/keyword_warp.py on the tiny fixture policy as the SFT model: the job reads the
    # prompts and their keyword column from prompts.jsonl (no columns handed over by hand)
    import runpy
    shutil.copytree(tiny_gpt2_dir, tmp_path / "tiny" / "sft")
    script = os.path.join(ROOT, "examples", "rewards", "keyword_warp.py")
    example = runpy.run_path(script, run_name="keyword_warp")
    threads = torch.get_num_threads()
    try:
        example["main"](["--tiny", str(tmp_path / "tiny"), "--out_dir", str(tmp_path / "job"), "--steps", "1",
                         "--samples", "2"])
    finally:
        torch.set_num_threads(threads)
    assert re.search(r"keyword rate on 16 prompts x 2 completions: SFT \d\.\d{3} -> WARP \d\.\d{3}",
                     capsys.readouterr().out)
    rows = [json.loads(line) for line in open(tmp_path / "job" / "metrics.jsonl")]
    assert len(rows) == 2 and all("reward/keyword_reward" in row for row in rows)
