"""reproduce.py end to end on a tiny IMDB in the official layout, with tiny sizes: every stage
writes an ordinary checkpoint, the results and (with matplotlib) the plot, and a second run
skips what is done."""

import json
import os

import pytest
import torch

import reproduce
from conftest import write_tiny_imdb
from nanowarp.models.distilbert import DistilBertClassifier
from nanowarp.models.gpt2 import GPT2
from nanowarp.study import evaluation, tiny
from nanowarp.study.diagnose import sentiment_words
from nanowarp.study.report import rounded, table_models
from nanowarp.supervised import fit_review
from nanowarp.tokenizer import load_tokenizer
from test_report import CLAIMS

TINY = ["--policy_vocab", "300", "--reward_vocab", "200", "--policy_layers", "1", "--policy_width", "16",
        "--reward_layers", "1", "--reward_width", "16", "--steps", "2", "--batch_size", "4", "--max_new_tokens", "8",
        "--n_eval", "4", "--n_reference", "2", "--heldout", "4", "--samples", "1", "--etas", "0", "0.5", "1", "--ppl_reviews", "0", "--threads", "1", "--device", "cpu"]
# one process: a stage in a spawned process costs seconds of imports; the process paths have their own tests
# (side by side: test_supervised_resume.py; train.py's workers: test_parallel.py; the evaluation's: below)
IN_PROCESS = ["--workers", "1"]


@pytest.fixture(scope="module")
def reproduction(tmp_path_factory):
    threads = torch.get_num_threads()
    source, out = tmp_path_factory.mktemp("imdb"), tmp_path_factory.mktemp("tiny")
    write_tiny_imdb(str(source))
    reproduce.main(["--source", str(source), "--out_dir", str(out), *TINY, *IN_PROCESS])
    yield str(source), str(out)
    torch.set_num_threads(threads)


def test_every_stage_writes_an_ordinary_checkpoint(reproduction):
    _, out = reproduction
    sft = GPT2.from_pretrained(os.path.join(out, "sft"))
    assert sft.config.n_layer == 1 and sft.config.n_embd == 16
    assert DistilBertClassifier.from_pretrained(os.path.join(out, "reward_model")).config.id2label[1] == "POSITIVE"
    for job, iterations in (("reinforce", 3), ("rloo", 2), ("fixed_anchor", 1)):
        for name in ("run_0", "run_1", "slerp", "liti"):
            assert os.path.isfile(os.path.join(out, "seed_0", job, f"iter_{iterations}", name, "model.safetensors"))


def test_results_hold_the_table_the_claims_and_the_stage_times(reproduction):
    _, out = reproduction
    results = json.load(open(os.path.join(out, "results.json")))
    assert [row["setup"] for row in results["table"]] == [label for label, _ in table_models("fast")]
    assert results["table"][0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the SFT model against itself
    assert [c["name"] for c in results["claims"]] == CLAIMS
    head = results["headline"]
    assert head["model"] == "reinforce/iter_3/liti" and head["seeds"] == 1 and head["judge_gain_se"] > 0
    rows = results["evaluations"]["0"]["rows"]
    bon = {r["best_of"]: r for r in rows if r.get("best_of")}
    sft = next(r for r in rows if r["model"] == "sft")
    assert sorted(bon) == [1, 2, 4, 8, 16] and (bon[1]["reward"], bon[1]["judge"]) == (sft["reward"], sft["judge"])
    assert all(bon[a]["reward"] <= bon[b]["reward"] for a, b in ((1, 2), (2, 4), (4, 8), (8, 16)))
    stages = {"tokenizers", "prepare", "sft", "reward", "judge", "diagnose", "signal", "seed_0/reinforce", "seed_0/rloo", "seed_0/fixed_anchor",
              "seed_0/evaluate"}
    assert set(results["stage_seconds"]) == stages
    sweep = [r for r in results["evaluations"]["0"]["rows"] if r.get("sweep") == "reinforce/iter_2/slerp"]
    assert [r["eta"] for r in sweep] == [0.0, 0.5, 1.0]
    markdown = open(os.path.join(out, "results.md")).read()
    assert "| WARP + RLOO (k=4) I=2 |" in markdown and "| total |" in markdown
    assert str(out) not in markdown + json.dumps(results)  # no machine paths in the results


def test_plot_is_written_when_matplotlib_is_installed(reproduction):
    pytest.importorskip("matplotlib")
    _, out = reproduction
    with open(os.path.join(out, "pareto.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_second_run_skips_every_finished_stage(reproduction, capsys):
    source, out = reproduction
    before = os.path.getmtime(os.path.join(out, "sft", "model.safetensors"))
    reproduce.main(["--source", source, "--out_dir", out, *TINY])  # --workers is not a setting: skipped all the same
    printed = capsys.readouterr().out
    assert printed.count("skipped") == 11 and "0 stages run" in printed
    assert os.path.getmtime(os.path.join(out, "sft", "model.safetensors")) == before


def test_a_deleted_stage_is_redone_with_the_stages_computed_from_it(reproduction, tmp_path, capsys, monkeypatch):
    import shutil
    from nanowarp.study import report
    source, out = reproduction
    # which stages run again is tested here; what the evaluation and the plot compute, by the fixture's
    # run and their own tests: the fixture's evaluation stands in for the seconds each rerun would take
    evaluated = json.load(open(os.path.join(out, "results.json")))["evaluations"]["0"]
    monkeypatch.setattr(reproduce, "evaluate_seed", lambda args, seed: json.loads(json.dumps(evaluated)))
    monkeypatch.setattr(report, "plot_results", lambda *a, **k: None)
    rerun = ["--source", source, "--out_dir", str(tmp_path / "copy"), *TINY, *IN_PROCESS]
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    before = json.load(open(os.path.join(copy, "stages.json")))
    shutil.rmtree(os.path.join(copy, "seed_0", "rloo"))
    reproduce.main(rerun)
    printed = capsys.readouterr().out
    assert "3 stages run" not in printed and "2 stages run" in printed
    assert "seed_0/evaluate: done earlier, redone since seed_0/rloo changed" in printed
    after = json.load(open(os.path.join(copy, "stages.json")))
    assert after["seed_0/rloo"] != before["seed_0/rloo"]  # redone (its time differs)
    assert after["seed_0/reinforce"] == before["seed_0/reinforce"]

    # an invocation that stopped after redoing a WARP job: the next one still redoes the evaluation
    stages = json.load(open(os.path.join(copy, "stages.json")))
    stages["seed_0/fixed_anchor"]["finished_at"] = stages["seed_0/evaluate"]["finished_at"] + 1
    reproduce.write_json(os.path.join(copy, "stages.json"), stages)
    reproduce.main(rerun)
    printed = capsys.readouterr().out
    assert "1 stages run" in printed and "redone since seed_0/fixed_anchor changed" in printed

    shutil.rmtree(os.path.join(copy, "reward_model"))  # the models change: every WARP job starts over
    reproduce.main(rerun)
    printed = capsys.readouterr().out
    assert "7 stages run" in printed  # reward, diagnose, signal, 3 WARP jobs, evaluation
    assert printed.count("--fresh: deleted the earlier job's results") == 3


def test_the_evaluation_in_two_processes_gives_the_rows_of_one(reproduction):
    """evaluate_seed's process pool: the same rows, in the same order, as the in-process evaluation
    that wrote results.json (every task draws from its own seeded generator)."""
    source, out = reproduction
    args = reproduce.parse_args(["--source", source, "--out_dir", out, *TINY, "--workers", "2"])
    rows = json.loads(json.dumps(rounded(evaluation.evaluate_seed(args, 0)["rows"])))  # as results.json stores them
    assert rows == json.load(open(os.path.join(out, "results.json")))["evaluations"]["0"]["rows"]


def test_sft_reviews_are_cut_after_their_last_whole_sentence(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    text = "I loved it. The cast was great! But the ending dragged on and on"
    enc = tok.encode(text)
    assert fit_review(enc, text, len(enc.ids) + 1, -1) == enc.ids + [-1]  # it fits: whole, then EOS
    cut = fit_review(enc, text, len(enc.ids), -1)
    assert cut[-1] == -1 and tok.decode(cut[:-1]) == "I loved it. The cast was great!"
    no_end = "an endless sentence without a stop"
    enc = tok.encode(no_end)
    assert fit_review(enc, no_end, 4, -1) == enc.ids[:3] + [-1]  # no sentence end: cut at the limit


def test_other_settings_in_the_same_folder_are_refused(reproduction, capsys):
    source, out = reproduction
    argv = ["--source", source, "--out_dir", out, *TINY]
    argv[argv.index("--steps") + 1] = "3"
    with pytest.raises(SystemExit) as e:
        reproduce.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("reproduce.py: error:") and "--steps 2 (now 3)" in err


def test_sentiment_words_are_those_that_separate_the_labels():
    texts = ["a great film", "a great cast", "a good film", "a awful film", "a awful cast", "a bad film"] * 40
    labels = [1, 1, 1, 0, 0, 0] * 40
    positive, negative = sentiment_words(texts, labels, n=2, min_reviews=10)
    assert positive == ["great", "good"] and negative == ["awful", "bad"]  # "a", "film", "cast": in both


def test_the_sentiment_setting_runs_rloo_and_its_fixed_anchor_ablation_at_60_tokens():
    """--setting sentiment: its preset's steps, batch and length unless given, its own folder, and a
    plan of the main job's checkpoints, sweeps and LERP (rloo), the ablation's, and best-of-N first."""
    args = reproduce.parse_args(["--setting", "sentiment"])
    assert (args.out_dir, args.steps, args.batch_size, args.max_new_tokens) == ("runs/sentiment", 600, 64, 60)
    assert tiny.jobs(args) == ["rloo", "fixed_anchor"] and tiny.main_job(args) == "rloo"
    rloo = tiny.job_settings(args, "rloo")  # RLOO k = 4; the ablation differs by its anchor alone (and I)
    assert rloo["rloo_k"] == 4 and rloo["iterations"] == 2
    assert tiny.job_settings(args, "fixed_anchor") == {**rloo, "anchor": "init", "iterations": 1}
    tasks, geometry = evaluation.seed_plan(args, 0)
    names = [name for name, _, _ in tasks]
    assert names[:2] == ["best-of-N", "sft"] and tasks[0][1] == ("best_of", (1, 2, 4, 8, 16))
    assert "rloo/iter_1/lerp" in names and "rloo/iter_2/slerp eta=0.6" in names and "fixed_anchor/iter_1/liti" in names
    assert not any(n.startswith("reinforce/") for n in names)
    assert sorted(geometry) == ["fixed_anchor/iter_1", "rloo/iter_1", "rloo/iter_1/lerp", "rloo/iter_2"]
    fast = reproduce.parse_args(["--steps", "5"])
    assert (fast.setting, fast.out_dir, fast.steps, fast.max_new_tokens) == ("fast", "runs/tiny", 5, 40)


def test_the_demo_setting_is_the_sentiment_setting_with_runs_half_as_long_and_no_ablation():
    args = reproduce.parse_args(["--setting", "demo"])
    assert (args.out_dir, args.steps, args.batch_size, args.max_new_tokens) == ("runs/demo", 300, 64, 60)
    assert tiny.jobs(args) == ["rloo"] and tiny.main_job(args) == "rloo"
    sentiment = reproduce.parse_args(["--setting", "sentiment"])
    assert tiny.job_settings(args, "rloo") == {**tiny.job_settings(sentiment, "rloo"), "steps": 300, "ema_rate": 1 / 300}
    names = [name for name, _, _ in evaluation.seed_plan(args, 0)[0]]
    assert "rloo/iter_2/slerp eta=0.6" in names and not any(n.startswith("fixed_anchor/") for n in names)
    assert reproduce.parse_args(["--setting", "demo", "--steps", "7"]).steps == 7
