"""Tests for nanowarp.evaluate and eval.py: KL to a reference and reward, on tiny models."""

import importlib.util
import json
import math
import os
import sys

import pytest
import torch

import eval as eval_cli
from conftest import perturbed_copy
from nanowarp.data import load_prompts, load_reviews
from nanowarp.evaluate import (batch_seed, best_of_n, best_of_n_kl, distinct_n, evaluate, heldout_nll,
                               heldout_sequences, liti_sweep)
from nanowarp.models.gpt2 import GPT2
from nanowarp.padding import left_pad
from nanowarp.plots import plot
from nanowarp.reward import Reward, RewardModel
from nanowarp.rl import decode
from nanowarp.sampling import sample
from nanowarp.supervised import fit_review
from nanowarp.tokenizer import load_tokenizer

MAX_NEW = 12


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Models this small run dozens of tiny matmuls per token: with several threads, their
    synchronisation costs more than the arithmetic (10x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def eos_prone(model, logit=4.0):
    """Add `logit` to EOS's logit through the final LayerNorm's bias (the LM head is tied to wte):
    about half of the completions then stop within MAX_NEW tokens, so lengths, masks and the −1
    rule all matter."""
    eos = model.config.eos_token_id
    with torch.no_grad():
        w = model.transformer.wte.weight[eos]
        model.transformer.ln_f.bias.copy_(logit * w / w.square().sum())
    return model


@pytest.fixture(scope="module")
def setup(tiny_gpt2_dir, tiny_reward_dir, prepared_imdb_dir, tmp_path_factory):
    ref = eos_prone(GPT2.from_pretrained(tiny_gpt2_dir))
    far = eos_prone(GPT2.from_pretrained(perturbed_copy(tiny_gpt2_dir, str(tmp_path_factory.mktemp("far")), 1, 0.1)))
    prompts = load_prompts(prepared_imdb_dir, "train") + load_prompts(prepared_imdb_dir, "eval")  # 12
    reward_model = RewardModel(tiny_reward_dir)
    return dict(ref=ref, far=far, reward=Reward([reward_model]), reward_model=reward_model, prompts=prompts,
                tokenizer=load_tokenizer(tiny_gpt2_dir), eos_id=ref.config.eos_token_id)


def run(s, policy, ref=None, **kw):
    kw = dict(dict(max_new_tokens=MAX_NEW, batch_size=5), **kw)  # 12 prompts: batches of 5, 5, 2
    return evaluate(policy, ref if ref is not None else s["ref"], s["reward"], s["prompts"], s["tokenizer"],
                    s["eos_id"], **kw)


def test_kl_of_a_model_against_itself_is_zero(setup):
    result = run(setup, setup["ref"])
    assert abs(result["kl"]) < 1e-4
    assert 0 < result["finished"] < 1  # the test covers finished and unfinished completions
    assert result["n"] == len(setup["prompts"])


def test_kl_against_itself_is_zero_at_another_temperature(setup):
    """Both log-probs at the sampling temperature (one at T, the other at 1 gives KL != 0)."""
    assert abs(run(setup, setup["ref"], temperature=0.7)["kl"]) < 1e-4


def test_a_different_model_has_positive_kl(setup):
    assert run(setup, setup["far"])["kl"] > 0.1


def test_metrics_match_a_by_hand_computation(setup):
    """Reward = RewardModel on the decoded texts (−1 without EOS); KL = Σ over completion tokens
    up to EOS of log π − log π_ref, with π_ref from a plain full-vocabulary log_softmax."""
    s, seed = setup, 3
    result = run(s, s["far"], seed=seed)
    rewards, kls, finished, lengths = [], [], [], []
    for start in range(0, 12, 5):
        batch = s["prompts"][start:start + 5]
        g = torch.Generator().manual_seed(batch_seed(seed, start // 5))
        out = sample(s["far"], batch, MAX_NEW, eos_token_id=s["eos_id"], generator=g)
        n = out.mask.sum(1)
        texts = decode(s["tokenizer"], batch, out.tokens, n)
        rewards += torch.where(out.finished, s["reward_model"].score(texts), -1.0).tolist()
        ids, mask = left_pad(batch, s["eos_id"], "cpu")
        full = torch.cat([ids, out.tokens], 1)
        logits = s["ref"](full, torch.cat([mask, torch.ones_like(out.tokens)], 1))[:, ids.size(1) - 1:-1]
        ref_lp = logits.log_softmax(-1).gather(2, out.tokens[:, :, None]).squeeze(2)
        kls += ((out.logprobs - ref_lp) * out.mask).sum(1).tolist()
        finished += out.finished.tolist()
        lengths += n.tolist()
    assert -1.0 in rewards and any(r != -1.0 for r in rewards)
    assert result["reward"] == pytest.approx(sum(rewards) / 12, abs=1e-6)
    assert result["kl"] == pytest.approx(sum(kls) / 12, abs=1e-4)
    assert result["finished"] == pytest.approx(sum(finished) / 12)
    assert result["length"] == pytest.approx(sum(lengths) / 12)


def test_new_metrics_match_a_by_hand_computation(setup):
    """kl_exact = Σ over completion tokens up to EOS of the float64 full-vocabulary KL; judge =
    mean P(positive) over all completions (no −1 rule); distinct_n over token ids, EOS excluded;
    the older metrics are the same numbers with or without the new ones."""
    s, seed = setup, 5
    judge = s["reward_model"]  # the same classifier as judge: only the −1 rule differs
    result = run(s, s["far"], seed=seed, judge=judge)
    assert {k: result[k] for k in ("kl", "reward", "finished", "length", "n", "kl_se", "reward_se")} == \
        {k: v for k, v in run(s, s["far"], seed=seed).items() if k in ("kl", "reward", "finished", "length", "n",
                                                                       "kl_se", "reward_se")}
    kls, judged, completions = [], [], []
    for start in range(0, 12, 5):
        batch = s["prompts"][start:start + 5]
        g = torch.Generator().manual_seed(batch_seed(seed, start // 5))
        out = sample(s["far"], batch, MAX_NEW, eos_token_id=s["eos_id"], generator=g)
        n = out.mask.sum(1)
        judged += judge.score(decode(s["tokenizer"], batch, out.tokens, n)).tolist()
        ids, mask = left_pad(batch, s["eos_id"], "cpu")
        full = torch.cat([ids, out.tokens], 1)
        full_mask = torch.cat([mask, torch.ones_like(out.tokens)], 1)
        logp, logq = (m(full, full_mask)[:, ids.size(1) - 1:-1].double().log_softmax(-1) for m in (s["far"], s["ref"]))
        kls += ((logp.exp() * (logp - logq)).sum(-1) * out.mask).sum(1).tolist()
        completions += [t[:k] for t, k in zip(out.tokens.tolist(), (n - out.finished.long()).tolist())]
    assert min(kls) > 0 and result["kl_exact"] == pytest.approx(sum(kls) / 12, rel=1e-5)
    assert result["kl_exact_se"] == pytest.approx(torch.tensor(kls).std().item() / 12 ** 0.5, rel=1e-4)
    assert result["judge"] == pytest.approx(sum(judged) / 12, abs=1e-6) and all(0 < j < 1 for j in judged)
    assert s["eos_id"] not in sum(completions, [])
    for k in (1, 2):
        grams = [tuple(c[i:i + k]) for c in completions for i in range(len(c) - k + 1)]
        assert result[f"distinct_{k}"] == len(set(grams)) / len(grams)
    assert "heldout_nll" not in result


def test_kl_exact_of_a_model_against_itself_is_zero(setup):
    result = run(setup, setup["ref"], temperature=0.7)
    assert result["kl_exact"] == 0 and "judge" not in result


def test_distinct_n_counts_n_grams_within_completions():
    assert distinct_n([[1, 2, 1, 2], [2, 1]], 1) == 2 / 6
    assert distinct_n([[1, 2, 1, 2], [2, 1]], 2) == 2 / 4  # (1,2) (2,1) (1,2) | (2,1); none spans two completions
    assert distinct_n([[5], []], 2) == 0.0


def test_heldout_nll_is_the_mean_nll_per_token_of_test_reviews(setup, prepared_imdb_dir):
    s = setup
    texts, labels = load_reviews(prepared_imdb_dir, "test")
    seqs = heldout_sequences(prepared_imdb_dir, 4, s["tokenizer"], 24, s["eos_id"])
    assert len(seqs) == 4 and all(len(q) <= 24 and q[-1] == s["eos_id"] for q in seqs)
    assert any(len(q) == 24 for q in seqs)  # some were cut
    picked = [0, 4, 7, 11]  # 4 of the 12 test reviews, evenly spaced over the split (sorted by label)
    assert [labels[i] for i in picked] == [0, 0, 1, 1]
    assert seqs == [fit_review(s["tokenizer"].encode(texts[i]), texts[i], 24, s["eos_id"]) for i in picked]
    nll, count = 0.0, 0
    for q in seqs:
        ids = torch.tensor([q])
        logp = s["far"](ids[:, :-1]).double().log_softmax(-1).gather(2, ids[:, 1:, None])
        nll, count = nll - logp.sum().item(), count + len(q) - 1
    assert heldout_nll(s["far"], seqs, s["eos_id"]) == pytest.approx(nll / count, rel=1e-5)
    assert run(s, s["far"], heldout=seqs)["heldout_nll"] == heldout_nll(s["far"], seqs, s["eos_id"])


def test_every_model_sees_the_same_random_numbers(setup, tiny_gpt2_dir, monkeypatch):
    """A model whose completions all end at once and one that never ends draw different amounts of
    random numbers per batch; each batch must still start from the same generator state."""
    import nanowarp.evaluate as ev
    states = []

    def spy(*args, generator=None, **kw):
        states.append(generator.get_state())
        return sample(*args, generator=generator, **kw)

    monkeypatch.setattr(ev, "sample", spy)
    early = eos_prone(GPT2.from_pretrained(tiny_gpt2_dir), 50.0)  # EOS first, every row
    late = eos_prone(GPT2.from_pretrained(tiny_gpt2_dir), -50.0)  # never EOS
    assert run(setup, early)["length"] == 1 and run(setup, late)["length"] == MAX_NEW
    assert len(states) == 6
    assert all(torch.equal(a, b) for a, b in zip(states[:3], states[3:]))  # batch by batch


def test_same_seed_same_results_other_seed_other_samples(setup):
    a, b, c = run(setup, setup["far"], seed=7), run(setup, setup["far"], seed=7), run(setup, setup["far"], seed=8)
    assert a == b
    assert a != c


def test_liti_sweep_end_points_are_the_two_models(setup):
    a, b = setup["ref"].hf_state_dict(), setup["far"].hf_state_dict()
    holder = GPT2(setup["ref"].config)
    s = setup
    points = liti_sweep(a, b, [0.0, 0.5, 1.0], holder, s["ref"], s["reward"], s["prompts"], s["tokenizer"],
                        s["eos_id"], max_new_tokens=MAX_NEW, batch_size=5)
    assert [p["eta"] for p in points] == [0.0, 0.5, 1.0]
    assert {k: v for k, v in points[0].items() if k != "eta"} == run(s, s["ref"])
    assert {k: v for k, v in points[2].items() if k != "eta"} == run(s, s["far"])
    assert 0 < points[1]["kl"]


SWEEP_ROWS = [dict(model="sft", kl=0.0, reward=-0.6)] + [
    dict(model=f"liti(a,b,eta={e})", kl=e, reward=e - 0.5, eta=e, sweep="liti(a,b)") for e in (0, 0.5, 1)]


def bon(s, ns, **kw):
    kw = dict(dict(max_new_tokens=MAX_NEW, batch_size=5), **kw)  # batches of 5, 5, 2 as run()
    return best_of_n(s["ref"], s["reward"], s["prompts"], s["tokenizer"], s["eos_id"], ns, **kw)


def test_best_of_one_is_the_reference_row(setup):
    """Draw 0 of each batch comes from evaluate()'s random stream: best-of-1 is the reference's row."""
    row, ref = bon(setup, [1], seed=3)[0], run(setup, setup["ref"], seed=3)
    assert row["best_of"] == 1 and row["kl"] == 0
    assert {k: row[k] for k in ("reward", "reward_se", "finished", "length", "distinct_1", "distinct_2")} == \
        {k: ref[k] for k in ("reward", "reward_se", "finished", "length", "distinct_1", "distinct_2")}


def test_best_of_n_keeps_the_reward_models_favourite_of_the_first_n_draws(setup):
    """Rows nested: best-of-n is the max over the first n draws of one stream, reward non-decreasing in
    n; recomputed by hand from the draws, and the judge scores the kept completions."""
    s, ns, seed = setup, [1, 2, 4], 5
    rows = bon(s, [4, 1, 2, 2], seed=seed, judge=s["reward_model"])  # unsorted, repeated: sorted, once
    assert [r["best_of"] for r in rows] == ns
    assert [r["kl"] for r in rows] == [best_of_n_kl(n) for n in ns] and rows[0]["kl"] == 0
    assert rows[1]["kl"] == pytest.approx(math.log(2) - 0.5) and rows[2]["kl"] == pytest.approx(math.log(4) - 0.75)
    rewards, texts = [], []  # by hand: (draw, prompt)
    for start in range(0, 12, 5):
        batch = s["prompts"][start:start + 5]
        generator = torch.Generator().manual_seed(batch_seed(seed, start // 5))
        draws = [sample(s["ref"], batch, MAX_NEW, eos_token_id=s["eos_id"], generator=generator) for _ in range(4)]
        decoded = [decode(s["tokenizer"], batch, d.tokens, d.mask.sum(1)) for d in draws]
        scores = torch.stack([torch.where(d.finished, s["reward_model"].score(t), -1.0) for t, d in zip(decoded, draws)])
        rewards.append(scores)
        texts += [[decoded[j][b] for j in range(4)] for b in range(len(batch))]
    rewards = torch.cat(rewards, 1)  # (4, 12)
    for n, row in zip(ns, rows):
        best = rewards[:n].max(0).values
        assert row["reward"] == pytest.approx(best.double().mean().item(), abs=1e-6)
        kept = [texts[b][j] for b, j in enumerate(rewards[:n].argmax(0).tolist())]
        judged = s["reward_model"].score(kept).double().mean().item()  # the judge: no −1 rule
        assert row["judge"] == pytest.approx(judged, abs=1e-6) and row["n"] == 12
    assert rows[0]["reward"] < rows[1]["reward"] <= rows[2]["reward"]  # nested rows: never decreasing
    assert (rewards[1:] != rewards[:1]).any()  # the draws differ


def test_best_of_n_ties_keep_the_first_draw(setup, monkeypatch):
    """A reward model that scores every text alike keeps draw 0: best-of-4 is then best-of-1."""
    monkeypatch.setattr(setup["reward"], "score", lambda texts, finished, columns: (torch.zeros(len(texts)), {}))
    rows = bon(setup, [1, 4], seed=2)
    assert {k: rows[1][k] for k in ("length", "distinct_2")} == {k: rows[0][k] for k in ("length", "distinct_2")}


def test_best_of_n_refuses_n_below_one(setup):
    with pytest.raises(ValueError, match="n >= 1"):
        bon(setup, [0, 2])


def test_plot_draws_kl_against_reward(tmp_path):
    pytest.importorskip("matplotlib")
    assert plot(SWEEP_ROWS, str(tmp_path / "p.png"))
    assert os.path.getsize(tmp_path / "p.png") > 0


def test_plot_without_matplotlib_says_so_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    notes = []
    assert plot(SWEEP_ROWS, str(tmp_path / "p.png"), log=notes.append) is False
    assert len(notes) == 1 and "matplotlib" in notes[0]
    assert not (tmp_path / "p.png").exists()


# ---- eval.py ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_args(tiny_gpt2_dir, tiny_reward_dir, prepared_imdb_dir, tmp_path_factory):
    other = perturbed_copy(tiny_gpt2_dir, str(tmp_path_factory.mktemp("policy")), 2, 0.05)
    return dict(sft=tiny_gpt2_dir, other=other, argv=[
        "--ref", tiny_gpt2_dir, "--reward_model", tiny_reward_dir, "--data", prepared_imdb_dir,
        "--n_prompts", "3", "--seed", "0", "--max_new_tokens", "8", "--device", "cpu", "--batch_size", "2"])


def test_cli_writes_results_with_models_and_sweep_rows(cli_args, tmp_path, capsys):
    sft, other, out = cli_args["sft"], cli_args["other"], str(tmp_path / "results.json")
    eval_cli.main(["--models", sft, other, "--sweep", sft, other, "--etas", "0", "0.5", "1", "--out", out,
                   *cli_args["argv"]])
    rows = json.load(open(out))
    assert [r["model"] for r in rows] == [sft, other] + [f"liti({sft},{other},eta={e})" for e in ("0", "0.5", "1")]
    for r in rows:
        assert {"model", "kl", "reward", "finished", "length", "n_prompts"} <= r.keys()
        assert r["n_prompts"] == 3 and 0 <= r["finished"] <= 1
    assert [r.get("eta") for r in rows] == [None, None, 0.0, 0.5, 1.0]
    assert abs(rows[0]["kl"]) < 1e-4  # the reference against itself
    for model_row, sweep_row in ((rows[0], rows[2]), (rows[1], rows[4])):  # η = 0 is A, η = 1 is B
        assert (sweep_row["kl"], sweep_row["reward"]) == (model_row["kl"], model_row["reward"])
    printed = capsys.readouterr().out
    assert "reward" in printed and f"liti({sft},{other},eta=0.5)" in printed


def test_cli_rows_gain_kl_exact_distinct_judge_and_heldout_nll(cli_args, judge_dir, tiny_reward_dir, tmp_path,
                                                                capsys):
    sft, other, out = cli_args["sft"], cli_args["other"], str(tmp_path / "r.json")
    eval_cli.main(["--models", sft, other, "--out", out, "--plot", "none", "--judge", judge_dir, "--heldout", "3",
                   *cli_args["argv"]])
    rows = json.load(open(out))
    for r in rows:
        assert r["kl_exact"] >= 0 and 0 < r["distinct_1"] <= 1 and 0 <= r["distinct_2"] <= 1
        assert 0 < r["judge"] < 1 and r["judge_se"] > 0 and r["heldout_nll"] > 0
    assert rows[0]["kl_exact"] == 0 and rows[1]["kl_exact"] > 0  # the reference against itself, then another
    assert rows[0]["heldout_nll"] != rows[1]["heldout_nll"]
    table = capsys.readouterr().out.split("model")[-1]
    assert all(k in table for k in ("KL exact", "dist-1", "dist-2", "judge", "heldout_nll"))
    eval_cli.main(["--models", sft, "--out", out, "--plot", "none", "--judge", tiny_reward_dir, *cli_args["argv"]])
    row = json.load(open(out))[0]  # a DistilBERT judge, no --heldout
    assert "heldout_nll" not in row and 0 < row["judge"] < 1
    assert {k: row[k] for k in ("kl", "reward", "kl_exact", "distinct_2")} == \
        {k: rows[0][k] for k in ("kl", "reward", "kl_exact", "distinct_2")}


def test_cli_best_of_rows_are_nested_at_the_analytic_kl(cli_args, judge_dir, tmp_path, capsys):
    sft, out = cli_args["sft"], str(tmp_path / "r.json")
    eval_cli.main(["--models", sft, "--best_of", "1", "2", "4", "--judge", judge_dir, "--out", out, *cli_args["argv"]])
    rows = json.load(open(out))
    bon = [r for r in rows if "best_of" in r]
    assert [r["best_of"] for r in bon] == [1, 2, 4] and [r["model"] for r in bon] == [f"best-of-{n}({sft})" for n in (1, 2, 4)]
    assert [r["kl"] for r in bon] == [best_of_n_kl(n) for n in (1, 2, 4)]
    assert bon[0]["reward"] == rows[0]["reward"] and bon[0]["judge"] == rows[0]["judge"]  # best-of-1 is --ref
    assert bon[0]["reward"] <= bon[1]["reward"] <= bon[2]["reward"]
    assert "kl_exact" not in bon[1] and 0 < bon[2]["judge"] < 1
    assert f"best-of-4({sft})" in capsys.readouterr().out
    assert (tmp_path / "r.png").exists() == (importlib.util.find_spec("matplotlib") is not None)
    eval_cli.main(["--best_of", "2", "--out", out, "--plot", "none", *cli_args["argv"]])  # best-of-N alone
    assert json.load(open(out))[0]["reward"] == bon[1]["reward"]


def test_cli_uses_all_prompts_when_asked_for_more(cli_args, tmp_path, capsys):
    out = str(tmp_path / "r.json")
    argv = [a if a != "3" else "1000" for a in cli_args["argv"]]
    eval_cli.main(["--models", cli_args["sft"], "--out", out, "--plot", "none", *argv])
    assert json.load(open(out))[0]["n_prompts"] == 4
    assert "using all" in capsys.readouterr().out
    assert not (tmp_path / "r.png").exists()


@pytest.mark.parametrize("case", ["missing model", "missing ref", "missing data", "zero prompts", "nothing",
                                  "missing judge", "negative heldout", "best of zero"])
def test_cli_refuses_bad_input_in_one_line(cli_args, tmp_path, capsys, case):
    missing = str(tmp_path / "missing")
    argv = {"missing model": ["--models", missing],
            "missing ref": ["--models", cli_args["sft"], "--ref", missing],
            "missing data": ["--models", cli_args["sft"], "--data", missing],
            "zero prompts": ["--models", cli_args["sft"], "--n_prompts", "0"],
            "nothing": [],
            "missing judge": ["--models", cli_args["sft"], "--judge", missing],
            "negative heldout": ["--models", cli_args["sft"], "--heldout", "-1"],
            "best of zero": ["--best_of", "0", "4"]}[case]
    with pytest.raises(SystemExit) as e:
        eval_cli.main([*cli_args["argv"], *argv, "--out", str(tmp_path / "r.json")])  # later flags win
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and err.startswith("eval.py: error:")
    assert not (tmp_path / "r.json").exists()


def test_cli_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        eval_cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--models", "--ref", "--reward_model", "--data", "--n_prompts", "--seed", "--out",
                 "--max_new_tokens", "--temperature", "--batch_size", "--device", "--sweep", "--etas", "--plot",
                 "--judge", "--heldout", "--best_of"):
        assert flag in out
