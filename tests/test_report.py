"""The report of a reproduction on hand-made evaluations: the statistics behind the claims, the
verdicts, the tables of results.md and results.json, and the KL–reward planes."""

import json
import math
import os

import pytest

from nanowarp import plots
from nanowarp.evaluate import best_of_n_kl
from nanowarp.study import claims, report


def evaluation(seed, main="reinforce"):
    """One seed's evaluation as reproduce.py records it, its main WARP job named `main`: the SLERP of
    each iteration 0.02 above its runs' reward, LERP 0.01 below SLERP, the EMA runs 0.01 above the
    fixed anchor's, each iteration's sweep higher than the last, best-of-N's judge 0.02 log N above the
    SFT model's; the seeds differ by a little noise."""
    noise = 0.001 * (seed - 1)
    rows = []

    def row(model, kl, reward, **extra):
        rows.append(dict(model=model, kl=kl, kl_exact=kl, reward=reward, judge=0.5 + 0.1 * reward, judge_se=0.01,
                         heldout_nll=5.0 + 0.1 * kl, distinct_2=0.8, finished=0.9, length=20.0, n=4, **extra))

    def sweep(name, kl, reward):
        for eta in (0.0, 0.5, 1.0):
            row(f"{name} eta={eta:g}", eta * kl, -0.2 + eta * (reward + 0.2), sweep=name, eta=eta)

    row("sft", 0.0, -0.2)
    for job, gap in ((main, 0.0), ("fixed_anchor", -0.01)):
        for i in (1, 2, 3) if job == main else (1,):
            for m in (0, 1):
                row(f"{job}/iter_{i}/run_{m}", 0.5 * i + 0.1 * m, 0.1 * i + gap + noise)
            row(f"{job}/iter_{i}/slerp", 0.5 * i + 0.3, 0.1 * i + 0.02 + gap + noise)
            row(f"{job}/iter_{i}/liti", 0.4 * i + noise, 0.1 * i + gap)
            sweep(f"{job}/iter_{i}/slerp", 0.5 * i + 0.3, 0.1 * i + 0.02 + gap + noise + 0.01 * i)
    row(f"{main}/iter_1/lerp", 0.6, 0.11 + noise)
    sweep(f"{main}/iter_1/lerp", 0.6, 0.11 + noise)
    if main == "reinforce":
        for i in (1, 2):
            row(f"rloo/iter_{i}/liti", 0.4 * i, 0.1 * i)
    for r in rows:
        r["reference"] = {k: r[k] for k in ("kl", "reward", "finished", "n")}
    for n in (1, 2, 4, 8, 16):
        rows.append(dict(model=f"best-of-{n}", best_of=n, kl=best_of_n_kl(n), reward=-0.2 + 0.1 * math.log(n),
                         judge=0.48 + 0.02 * math.log(n), length=20.0, n=4))
    geometry = {f"{main}/iter_{i}": dict(cos=0.2 + noise, cos_per_tensor_median=0.1, merge_norm_ratio=1.0)
                for i in (1, 2, 3)}
    geometry.update({f"{main}/iter_1/lerp": dict(cos=0.2, cos_per_tensor_median=0.1, merge_norm_ratio=0.8),
                     "fixed_anchor/iter_1": dict(cos=0.3, cos_per_tensor_median=0.2, merge_norm_ratio=1.0)})
    return dict(rows=rows, geometry=geometry)


def test_verdict_needs_the_claimed_sign_two_standard_errors_from_zero():
    assert claims.verdict([0.10, 0.11, 0.09]) == "holds"
    assert claims.verdict([-0.10, -0.11, -0.09]) == "does not hold"
    assert claims.verdict([-0.10, -0.11, -0.09], claimed_sign=-1) == "holds"
    assert claims.verdict([0.1, -0.1, 0.05]) == "inconclusive (within 2 standard errors)"
    assert claims.verdict([0.1]) == "one seed: the claimed sign"
    assert claims.verdict([None, None]) == "not measured"


def test_front_gain_compares_two_fronts_at_equal_kl():
    lower = [(0.0, 0.0), (1.0, 1.0)]
    assert claims.front_gain(lower, [(0.5, 0.7), (2.0, 5.0)]) == pytest.approx(0.2)  # 2.0 is beyond lower's KL
    assert claims.front_gain(lower, [(2.0, 5.0)]) is None


def test_numbers_are_formatted_without_minus_zero():
    assert claims.format_mean(-0.0001, None) == "0.000"
    assert claims.format_mean(0.1234, 0.01, sign=True) == "+0.123 ± 0.010"
    assert claims.summary([1.0, 3.0]) == f"2.000 ± {2 ** 0.5:.3f}"
    assert claims.format_gain([None]) == "n/a (the fronts' KL ranges do not overlap)"


CLAIMS = ["SLERP vs its runs", "SLERP vs LERP", "EMA anchor vs fixed anchor", "cosine between task vectors",
          "iterations push the front up", "KL grows with I", "the judge agrees", "front above the RL runs",
          "WARP vs best-of-N", "reward hacking", "less forgetting", "SLERP vs its runs (judge)",
          "SLERP vs LERP (judge)", "EMA anchor vs fixed anchor (judge)", "iterations push the front up (judge)",
          "front above the RL runs (judge)", "WARP vs best-of-N (judge)", "less forgetting (judge)"]


@pytest.mark.parametrize("main", ["reinforce", "rloo"])
def test_claims_on_three_seeds(main):
    found = {c["name"]: c for c in claims.claims([evaluation(s, main) for s in range(3)], main)}
    assert list(found) == CLAIMS
    assert found["SLERP vs its runs"]["verdict"] == "holds"
    assert found["SLERP vs its runs"]["numbers"][0] == "reward SLERP − mean of the 2 runs +0.020 ± 0.000"
    assert found["SLERP vs LERP"]["numbers"][2] == "‖δ_merge‖ / mean ‖δ_m‖: SLERP 1.000 ± 0.000, LERP 0.800 ± 0.000"
    assert found["EMA anchor vs fixed anchor"]["verdict"] == "holds"
    assert found["KL grows with I"]["numbers"][1] == "increasing at every iteration in 3 of 3 seed(s)"
    assert found["cosine between task vectors"]["verdict"] == "measured"
    # the judge is 0.5 + 0.1 reward here: every reward gap, a tenth of it in the judge's terms
    assert found["SLERP vs its runs (judge)"]["numbers"][0] == "judge SLERP − mean of the 2 runs +0.002 ± 0.000"
    assert found["SLERP vs its runs (judge)"]["verdict"] == "holds"
    # WARP I = 3 (KL 1.2, judge 0.53) against best-of-N's judge 0.48 + 0.02 log N at KL 1.2 (N ≈ 8)
    n = math.exp(next(g for g in [x / 1e4 for x in range(1, 40000)] if best_of_n_kl(math.exp(g)) >= 1.2))
    expected = 0.5 + 0.1 * 0.3 - (0.48 + 0.02 * math.log(n))
    number = found["WARP vs best-of-N (judge)"]["numbers"][0]
    assert number.startswith("WARP − best-of-N at equal KL ")
    assert float(number.split("KL ")[1].split(" ±")[0]) == pytest.approx(expected, abs=1.5e-3)


def test_headline_is_the_judge_gain_of_the_final_policy_against_best_of_n():
    """judge_gain: the final WARP policy's judge − the SFT model's; bon_fraction: ÷ best-of-N's judge gain
    at the same KL, best-of-N joined linearly in log N."""
    evals = [evaluation(s) for s in range(3)]
    for e in evals:  # the final policy at best-of-4's KL (every judge_se is 0.01)
        final = next(r for r in e["rows"] if r["model"] == "reinforce/iter_3/liti")
        final["kl"], final["judge"] = best_of_n_kl(4), 0.5 + 0.01 * math.log(4)
    head = claims.headline(evals, "reinforce")
    sft_judge = 0.5 - 0.1 * 0.2
    assert head["model"] == "reinforce/iter_3/liti" and head["seeds"] == 3
    assert head["judge_gain"] == pytest.approx(0.5 + 0.01 * math.log(4) - sft_judge)
    assert head["kl"] == pytest.approx(best_of_n_kl(4))
    bon_gain = 0.48 + 0.02 * math.log(4) - sft_judge
    assert head["bon_fraction"] == pytest.approx(head["judge_gain"] / bon_gain, abs=1e-3)
    assert head["judge_gain_se_prompts"] == pytest.approx(math.sqrt(3 * 2 * 0.01 ** 2) / 3)
    assert head["judge_gain_se_seeds"] == pytest.approx(0.0, abs=1e-12)  # the same gain in every seed
    assert head["judge_gain_se"] == head["judge_gain_se_prompts"]
    for e in evals:  # beyond the largest N: no fraction
        next(r for r in e["rows"] if r["model"] == "reinforce/iter_3/liti")["kl"] = 5.0
    assert claims.headline(evals, "reinforce")["bon_fraction"] is None


class Recorded:
    """What report.write_results reads of nanowarp.study.stages.Stages: the records, and wall_time."""

    def __init__(self, done):
        self.done = done

    def wall_time(self, names):
        return sum(self.done[n]["seconds"] for n in names)


def test_results_md_and_json_hold_the_tables_and_the_claims(tmp_path):
    seeds = [0, 1, 2]
    evals = [evaluation(s) for s in seeds]
    done = {"sft": dict(seconds=2.0, result=dict(test_perplexity=150.0, test_reviews=100)),
            "reward": dict(seconds=3.0, result=dict(test_accuracy=0.8, test_reviews=100)),
            "judge": dict(seconds=4.0, result=dict(test_accuracy=0.7, test_reviews=100))}
    done.update({f"seed_{s}/evaluate": dict(seconds=1.0, result=e) for s, e in zip(seeds, evals)})
    done["seed_0/reinforce"] = dict(seconds=1.0, result=dict(metrics={"1": {"0": dict(reward=[0.1, 0.2])}}))

    class Args:
        out_dir, n_eval, n_reference, heldout, setting = str(tmp_path), 4, 2, 3, "fast"

    Args.seeds = seeds
    markdown, _ = report.write_results(Args, Recorded(done), evals, dict(n_eval=4))
    assert markdown == (tmp_path / "results.md").read_text()
    assert "| WARP I=2 | 0.800 ± 0.001 | " in markdown and "| SLERP vs its runs | " in markdown
    assert "| total | 13 |" in markdown
    results = json.loads((tmp_path / "results.json").read_text())
    assert [t["setup"] for t in results["table"]] == [label for label, _ in report.table_models("fast")]
    assert results["table"][2]["kl"] == 0.8 and results["table"][2]["kl_spread"] == 0.001
    assert list(results)[0] == "headline" and results["headline"]["model"] == "reinforce/iter_3/liti"
    assert [t["best_of"] for t in results["best_of"]] == [1, 2, 4, 8, 16]
    assert markdown.startswith("**Headline** (reinforce/iter_3/liti, 3 seed(s)): judge gain over the SFT model")
    assert "| 16 | 1.835 | +0.077 ± 0.000 | 0.535 ± 0.000 | 20.0 |" in markdown  # log 16 − 15/16, −0.2 + 0.1 log 16
    assert results["settings"] == {"n_eval": 4} and results["total_seconds"] == 13.0


def test_rounded_gives_four_digits_and_no_minus_zero():
    assert report.rounded({"a": [0.123456, -0.00001], "b": "x"}) == {"a": [0.1235, 0.0], "b": "x"}
    assert str(report.rounded(-0.00001)) == "0.0"


def test_kl_reward_plane_draws_each_sweep_in_order_of_eta():
    figure = pytest.importorskip("matplotlib.figure")
    ax = figure.Figure().add_subplot()
    rows = list(reversed(evaluation(0)["rows"]))
    sweep, runs = plots.kl_reward_plane(ax, rows, "judge", [("reinforce/iter_2/slerp", ".-", dict(label="sweep")),
                                                            (["sft", "reinforce/iter_2/run_0"], "x", {})])
    assert list(sweep.get_xdata()) == [0.0, 0.65, 1.3] and sweep.get_label() == "sweep"
    assert list(runs.get_ydata()) == [r["judge"] for r in sorted(rows, key=lambda r: r["model"])
                                      if r["model"] in ("sft", "reinforce/iter_2/run_0")][::-1]


@pytest.mark.parametrize("setting", ["fast", "sentiment"])
def test_pareto_figure_is_written(tmp_path, setting):
    pytest.importorskip("matplotlib")
    main = report.SETTINGS[setting]["main"]
    metrics = {"1": {"0": dict(reward=[0.1, 0.2]), "1": dict(reward=[0.0, 0.3])}}
    done = {f"seed_0/{main}": dict(result=dict(metrics=metrics))}
    assert report.plot_results(evaluation(0, main), done, 0, str(tmp_path / "p.png"), setting)
    assert os.path.getsize(tmp_path / "p.png") > 0


def test_table_models_follow_the_setting():
    assert report.table_models("sentiment") == [("SFT", "sft"), ("WARP + RLOO (k=4) I=1", "rloo/iter_1/liti"),
                                                ("WARP + RLOO (k=4) I=2", "rloo/iter_2/liti")]
    assert [m for _, m in report.table_models("fast")][1:4] == [f"reinforce/iter_{i}/liti" for i in (1, 2, 3)]
