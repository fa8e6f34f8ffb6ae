"""The yardstick of docs/reproduction.md#the-yardstick: a shortened WARP iteration on the sentiment
reproduction's models, then its runs and their SLERP judged against best-of-N (tiny fixtures here:
the judge is the fixture classifier), and the arithmetic of its table."""

import json
import os

import pytest

from nanowarp.study import yardstick

# best-of-N's judge at its KLs: gains 0, +0.06, +0.10, +0.13 over N = 1
REFERENCE = [dict(kl=0.0, judge=0.5), dict(kl=0.193, judge=0.56), dict(kl=0.636, judge=0.6), dict(kl=1.204, judge=0.63)]


def test_best_of_n_gain_is_read_off_its_front_linearly():
    assert yardstick.bon_gain(REFERENCE, 0.0) == 0.0
    assert yardstick.bon_gain(REFERENCE, 0.193) == pytest.approx(0.06)
    assert yardstick.bon_gain(REFERENCE, 0.0965) == pytest.approx(0.03)
    assert yardstick.bon_gain(REFERENCE, (0.193 + 0.636) / 2) == pytest.approx(0.08)
    assert yardstick.bon_gain(REFERENCE, 1.3) is None  # beyond best-of-8


def test_summary_averages_the_two_runs_and_keeps_the_slerp_apart():
    models = dict(run_0=dict(judge=0.53, kl_exact=0.1), run_1=dict(judge=0.55, kl_exact=0.3),
                  slerp=dict(judge=0.56, kl_exact=0.4))
    s = yardstick.summary(dict(models=models), REFERENCE)
    assert s["runs"]["gain"] == pytest.approx(0.04) and s["runs"]["gain_se"] == pytest.approx(0.01)
    assert s["runs"]["kl"] == pytest.approx(0.2)
    assert s["runs"]["per_kl"] == pytest.approx((0.3 + 0.05 / 0.3) / 2)
    assert s["runs"]["per_kl_se"] == pytest.approx(abs(0.3 - 0.05 / 0.3) / 2)
    assert s["runs"]["per_root_kl"] == pytest.approx((0.03 / 0.1 ** 0.5 + 0.05 / 0.3 ** 0.5) / 2)
    assert s["runs"]["per_root_kl_se"] == pytest.approx(abs(0.03 / 0.1 ** 0.5 - 0.05 / 0.3 ** 0.5) / 2)
    bon_1, bon_2 = 0.03 / yardstick.bon_gain(REFERENCE, 0.1), 0.05 / yardstick.bon_gain(REFERENCE, 0.3)
    assert s["runs"]["bon_fraction"] == pytest.approx((bon_1 + bon_2) / 2)
    assert s["slerp"]["gain"] == pytest.approx(0.06) and s["slerp"]["gain_se"] == 0
    assert s["slerp"]["bon_fraction"] == pytest.approx(0.06 / yardstick.bon_gain(REFERENCE, 0.4))


@pytest.fixture
def reproduction(tmp_path, tiny_gpt2_dir, tiny_reward_dir, prepared_imdb_dir):
    """A folder laid out as the sentiment reproduction's: the fixture models and data."""
    for name, target in (("sft", tiny_gpt2_dir), ("reward_model", tiny_reward_dir), ("judge", tiny_reward_dir),
                         ("data", prepared_imdb_dir)):
        os.symlink(target, tmp_path / name)
    return str(tmp_path)


TRAIN = ["--", "--workers", "1", "--batch_size", "4", "--max_new_tokens", "4", "--device", "cpu"]


def test_each_call_appends_a_judged_row_and_prints_every_row(reproduction, capsys):
    own = ["--out_dir", reproduction, "--steps", "2", "--n_prompts", "3", "--threads", "1"]
    yardstick.main(["--name", "base", *own, *TRAIN])
    yardstick.main(["--name", "fast", *own, *TRAIN, "--lr", "1e-2"])
    rows = [json.loads(line) for line in open(os.path.join(reproduction, "yardstick", "rows.jsonl"))]
    assert [r["name"] for r in rows] == ["base", "fast"]
    assert rows[1]["flags"] == TRAIN[1:] + ["--lr", "1e-2"] and rows[1]["steps"] == 2
    job = json.load(open(os.path.join(reproduction, "yardstick", "fast", "job.json")))
    assert (job["lr"], job["iterations"], job["runs"], job["steps"], job["ema_rate"], job["rloo_k"]) == \
        (1e-2, 1, 2, 2, 0.5, 4)  # the sentiment preset, one iteration, μ = 1/T, the flags after --
    for row in rows:
        assert set(row["models"]) == {"run_0", "run_1", "slerp"} and -1 <= row["cos"] <= 1
        assert all(m["kl_exact"] > 0 and 0 <= m["judge"] <= 1 for m in row["models"].values())
    assert rows[0]["models"] != rows[1]["models"]
    reference = json.load(open(os.path.join(reproduction, "yardstick", "best_of_n_3x2_4.json")))
    assert [r["best_of"] for r in reference] == list(yardstick.BEST_OF) and reference[0]["n"] == 6
    printed = capsys.readouterr().out
    assert "best-of-N, N = 2, 4, 8: judge gain" in printed
    table = printed.split("| row |")[-1]
    assert "| base | `--name base --out_dir " in table and "| fast |" in table and "--lr 1e-2` | 20" in table


def test_more_iterations_judge_each_iterations_liti(reproduction, capsys):
    own = ["--out_dir", reproduction, "--steps", "2", "--n_prompts", "3", "--threads", "1", "--iterations", "2"]
    yardstick.main(["--name", "i2", *own, *TRAIN])
    [row] = [json.loads(line) for line in open(os.path.join(reproduction, "yardstick", "rows.jsonl"))]
    assert set(row["models"]) == {"run_0", "run_1", "slerp", "liti_1", "liti_2"} and row["iterations"] == 2
    job = json.load(open(os.path.join(reproduction, "yardstick", "i2", "job.json")))
    assert job["iterations"] == 2 and os.path.isdir(os.path.join(reproduction, "yardstick", "i2", "iter_2", "liti"))
    assert row["models"]["liti_1"] != row["models"]["liti_2"]
    printed = capsys.readouterr().out
    assert "i2, iteration 1: judge gain" in printed and "i2, iteration 2: judge gain" in printed


def test_a_named_row_is_reused_against_a_longer_front_and_other_settings_are_refused(reproduction, capsys):
    own = ["--out_dir", reproduction, "--steps", "2", "--n_prompts", "3", "--threads", "1"]
    yardstick.main(["--name", "base", *own, *TRAIN])
    before = open(os.path.join(reproduction, "yardstick", "rows.jsonl")).read()
    capsys.readouterr()
    yardstick.main(["--name", "base", *own, "--best_of", "1", "2", "4", "8", "16", *TRAIN])
    assert open(os.path.join(reproduction, "yardstick", "rows.jsonl")).read() == before  # no new row, no training
    longer = json.load(open(os.path.join(reproduction, "yardstick", "best_of_n_3x2_4_N1-2-4-8-16.json")))
    shorter = json.load(open(os.path.join(reproduction, "yardstick", "best_of_n_3x2_4.json")))
    assert [r["best_of"] for r in longer] == [1, 2, 4, 8, 16] and longer[:4] == shorter  # the draws are nested
    printed = capsys.readouterr().out
    assert "not trained again" in printed and "best-of-N, N = 2, 4, 8, 16: judge gain" in printed
    with pytest.raises(SystemExit, match="'base' has other settings"):
        yardstick.main(["--name", "base", *own, *TRAIN, "--lr", "1e-2"])


def test_liti_lines_by_hand():
    row = dict(name="x", models=dict(run_0={}, liti_1=dict(judge=0.54, judge_se=0.01, kl_exact=0.25),
                                     liti_2=dict(judge=0.55, judge_se=0.02, kl_exact=100.0),
                                     liti_3=dict(judge=0.5, judge_se=0.0, kl_exact=0.0)))
    first, second, third = yardstick.liti_lines(row, REFERENCE)
    assert third == "x, iteration 3: judge gain +0.000 ± 0.000 at KL 0.000, gain / √KL n/a, of best-of-N n/a"
    gain = 0.54 - REFERENCE[0]["judge"]
    assert first == (f"x, iteration 1: judge gain {gain:+.3f} ± 0.010 at KL 0.250, gain / √KL {gain / 0.5:.3f}, "
                     f"of best-of-N {gain / yardstick.bon_gain(REFERENCE, 0.25):.2f}")
    assert second.endswith("of best-of-N n/a (beyond best-of-8's KL)")


def test_a_folder_without_the_models_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="sft is missing: run `python reproduce.py --setting sentiment`"):
        yardstick.main(["--name", "x", "--out_dir", str(tmp_path)])
