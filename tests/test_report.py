"""The report of a reproduction on hand-made evaluations: the statistics behind the claims, the
verdicts, the tables of results.md and results.json, and the KL–reward planes."""

import json
import os

import pytest

from nanowarp import claims, plots, report


def evaluation(seed):
    """One seed's evaluation as reproduce.py records it: the SLERP of each iteration 0.02 above its
    runs' reward, LERP 0.01 below SLERP, the EMA runs 0.01 above the fixed anchor's, each iteration's
    sweep higher than the last; the seeds differ by a little noise."""
    noise = 0.001 * (seed - 1)
    rows = []

    def row(model, kl, reward, **extra):
        rows.append(dict(model=model, kl=kl, kl_exact=kl, reward=reward, judge=0.5 + 0.1 * reward,
                         heldout_nll=5.0 + 0.1 * kl, distinct_2=0.8, finished=0.9, length=20.0, n=4, **extra))

    def sweep(name, kl, reward):
        for eta in (0.0, 0.5, 1.0):
            row(f"{name} eta={eta:g}", eta * kl, -0.2 + eta * (reward + 0.2), sweep=name, eta=eta)

    row("sft", 0.0, -0.2)
    for job, gap in (("reinforce", 0.0), ("fixed_anchor", -0.01)):
        for i in (1, 2, 3) if job == "reinforce" else (1,):
            for m in (0, 1):
                row(f"{job}/iter_{i}/run_{m}", 0.5 * i + 0.1 * m, 0.1 * i + gap + noise)
            row(f"{job}/iter_{i}/slerp", 0.5 * i + 0.3, 0.1 * i + 0.02 + gap + noise)
            row(f"{job}/iter_{i}/liti", 0.4 * i + noise, 0.1 * i + gap)
            sweep(f"{job}/iter_{i}/slerp", 0.5 * i + 0.3, 0.1 * i + 0.02 + gap + noise + 0.01 * i)
    row("reinforce/iter_1/lerp", 0.6, 0.11 + noise)
    sweep("reinforce/iter_1/lerp", 0.6, 0.11 + noise)
    for i in (1, 2):
        row(f"rloo/iter_{i}/liti", 0.4 * i, 0.1 * i)
    for r in rows:
        r["reference"] = {k: r[k] for k in ("kl", "reward", "finished", "n")}
    geometry = {f"reinforce/iter_{i}": dict(cos=0.2 + noise, cos_per_tensor_median=0.1, merge_norm_ratio=1.0)
                for i in (1, 2, 3)}
    geometry.update({"reinforce/iter_1/lerp": dict(cos=0.2, cos_per_tensor_median=0.1, merge_norm_ratio=0.8),
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


def test_claims_on_three_seeds():
    found = {c["name"]: c for c in claims.claims([evaluation(s) for s in range(3)])}
    assert list(found) == ["SLERP vs its runs", "SLERP vs LERP", "EMA anchor vs fixed anchor",
                           "cosine between task vectors", "iterations push the front up", "KL grows with I",
                           "the judge agrees", "front above the RL runs (judge)", "reward hacking", "less forgetting"]
    assert found["SLERP vs its runs"]["verdict"] == "holds"
    assert found["SLERP vs its runs"]["numbers"][0] == "reward SLERP − mean of the 2 runs +0.020 ± 0.000"
    assert found["SLERP vs LERP"]["numbers"][2] == "‖δ_merge‖ / mean ‖δ_m‖: SLERP 1.000 ± 0.000, LERP 0.800 ± 0.000"
    assert found["EMA anchor vs fixed anchor"]["verdict"] == "holds"
    assert found["KL grows with I"]["numbers"][1] == "increasing at every iteration in 3 of 3 seed(s)"
    assert found["cosine between task vectors"]["verdict"] == "measured"


class Recorded:
    """What report.write_results reads of nanowarp.stages.Stages: the records, and wall_time."""

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
        out_dir, n_eval, n_reference, heldout = str(tmp_path), 4, 2, 3

    Args.seeds = seeds
    markdown, _ = report.write_results(Args, Recorded(done), evals, dict(n_eval=4))
    assert markdown == (tmp_path / "results.md").read_text()
    assert "| WARP I=2 | 0.800 ± 0.001 | " in markdown and "| SLERP vs its runs | " in markdown
    assert "| total | 13 |" in markdown
    results = json.loads((tmp_path / "results.json").read_text())
    assert [t["setup"] for t in results["table"]] == [label for label, _ in report.TABLE]
    assert results["table"][2]["kl"] == 0.8 and results["table"][2]["kl_spread"] == 0.001
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


def test_pareto_figure_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    metrics = {"1": {"0": dict(reward=[0.1, 0.2]), "1": dict(reward=[0.0, 0.3])}}
    done = {"seed_0/reinforce": dict(result=dict(metrics=metrics))}
    assert report.plot_results(evaluation(0), done, 0, str(tmp_path / "p.png"))
    assert os.path.getsize(tmp_path / "p.png") > 0
