"""
The report of a reproduction (reproduce.py's last stage): OUT/results.json (every number, rounded to
4 digits so that two reports can be diffed), OUT/results.md (the tables, the paper's claims with their
verdicts (nanowarp/study/claims.py), the diagnosis, sample completions and the stage times) and
OUT/pareto.png (the KL–reward planes and the training reward, when matplotlib is installed).

Its inputs are what the stages recorded (nanowarp/study/stages.py: `stages.done[name]["result"]`) and the
evaluations of the seeds (`{"rows": [...], "geometry": {...}}`, see nanowarp/study/claims.py).
"""

import os

import numpy as np

from nanowarp.study.claims import claims, format_mean, headline, job_iterations, mean_spread
from nanowarp.config import PRESETS
from nanowarp.hub import write_json, write_text
from nanowarp.plots import best_of_models, kl_reward_plane
from nanowarp.study.tiny import SETTINGS

JOB_LABELS = {"reinforce": "WARP", "rloo": "WARP + RLOO (k=4)"}  # the table's name of each job's WARP model


def table_models(setting):
    """The table's rows of a setting (tiny.SETTINGS): (setup, model), the SFT model then each WARP
    model I = 1.. of every job but the fixed-anchor ablation."""
    jobs = SETTINGS[setting]["jobs"]
    iterations = {job: {**PRESETS[SETTINGS[setting]["preset"]], **jobs[job]}["iterations"] for job in jobs}
    return [("SFT", "sft")] + [(f"{JOB_LABELS[job]} I={i}", f"{job}/iter_{i}/liti") for job in jobs if job in JOB_LABELS
                               for i in range(1, iterations[job] + 1)]
COLUMNS = ["kl", "kl_exact", "reward", "judge", "heldout_nll", "distinct_2", "finished", "length"]


def rounded(obj, digits=4):
    """obj with every float rounded: results files a reader can diff."""
    if isinstance(obj, float):
        return round(obj, digits) + 0.0  # + 0.0: no "-0.0"
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return obj


def table_rows(evals, setting, column_key=lambda row: row):
    """The TABLE's models: each column's mean over seeds and its spread (the std over seeds; with one
    seed, the standard error over the eval prompts where there is one)."""
    table = []
    for label, model in table_models(setting):
        per_seed = [next((r for r in e["rows"] if r["model"] == model), None) for e in evals]
        if any(r is None for r in per_seed):
            continue
        per_seed = [column_key(r) for r in per_seed]
        row = dict(setup=label, model=model)
        for c in (c for c in COLUMNS if c in per_seed[0]):
            mean, spread = mean_spread([r[c] for r in per_seed])
            row[c], row[c + "_spread"] = mean, spread if len(evals) > 1 else per_seed[0].get(c + "_se")
        table.append(row)
    return table


def write_results(args, stages, evals, settings):
    """results.json, results.md and pareto.png in args.out_dir; returns the markdown, and whether it
    plotted. args: reproduce.py's flags (out_dir, seeds, n_eval, n_reference, heldout); stages: the
    nanowarp.study.stages.Stages of the reproduction; evals: the seeds' evaluations, in the order of
    args.seeds; settings: what results.json records as the reproduction's settings."""
    main = SETTINGS[args.setting]["main"]
    table = table_rows(evals, args.setting)
    reference = table_rows(evals, args.setting, lambda row: row["reference"])
    found = claims(evals, main)
    head = headline(evals, main)
    best_of = best_of_table(evals)
    times = {name: record["seconds"] for name, record in stages.done.items()}
    results = dict(headline=head, seeds=args.seeds, settings=settings, table=table, reference_table=reference,
                   best_of=best_of, claims=found,
                   stage_seconds=times, total_seconds=stages.wall_time(list(times)),
                   evaluations={str(s): e for s, e in zip(args.seeds, evals)})
    write_json(os.path.join(args.out_dir, "results.json"), rounded(results))
    lines = headline_markdown(head) + tables_markdown(args, table, reference) + best_of_markdown(best_of) + \
        stages_markdown(stages.done, evals, table, args.seeds, main)
    markdown = "\n".join(lines + claims_markdown(found) + times_markdown(stages, times, args.seeds[0])) + "\n"
    write_text(os.path.join(args.out_dir, "results.md"), markdown)
    plotted = plot_results(evals[0], stages.done, args.seeds[0], os.path.join(args.out_dir, "pareto.png"), args.setting)
    return markdown, plotted


def best_of_table(evals):
    """Best-of-N of the SFT model, one row per N: each column's mean over seeds and its spread."""
    ns = sorted(r["best_of"] for r in evals[0]["rows"] if r.get("best_of"))
    table = []
    for n in ns:
        per_seed = [next(r for r in e["rows"] if r.get("best_of") == n) for e in evals]
        row = dict(best_of=n, kl=per_seed[0]["kl"])
        for c in ("reward", "judge", "length"):
            mean, spread = mean_spread([r[c] for r in per_seed])
            row[c], row[c + "_spread"] = mean, spread if len(evals) > 1 else per_seed[0].get(c + "_se")
        table.append(row)
    return table


def headline_markdown(head):
    """The headline: what WARP did to sentiment, in the judge's terms (lines)."""
    fraction = ("n/a (no best-of-N rows, or its KL beyond theirs)" if head["bon_fraction"] is None else
                f"{head['bon_fraction']:.2f} (its judge gain ÷ best-of-N's at the same KL)")
    return [f"**Headline** ({head['model']}, {head['seeds']} seed(s)): judge gain over the SFT model "
            f"{head['judge_gain']:+.3f} ± {head['judge_gain_se']:.3f} (standard error over seeds and prompts) at KL "
            f"{head['kl']:.3f}; best-of-N fraction {fraction}.", ""]


def best_of_markdown(table):
    """Best-of-N of the SFT model: the reference front (lines)."""
    if not table:
        return []
    return ["", "Best-of-N of the SFT model (N completions per prompt, the reward model keeps one; KL = log N − "
                "(N − 1)/N): the reference front.", "", "| N | KL | reward | judge | length |", "|---|---|---|---|---|"] + \
        [f"| {t['best_of']} | {t['kl']:.3f} | {format_mean(t['reward'], t['reward_spread'], sign=True)} | "
         f"{format_mean(t['judge'], t['judge_spread'])} | {t['length']:.1f} |" for t in table]


def tables_markdown(args, table, reference):
    """The results table on every eval prompt, then SPEC §2's on the reference's prompts (lines)."""
    spread = "± std over seeds" if len(args.seeds) > 1 else "± standard error over the eval prompts"
    lines = [f"On {args.n_eval} eval prompts (test reviews, half positive, half negative), {len(args.seeds)} seed(s) "
             f"({', '.join(map(str, args.seeds))}); {spread}. KL: the sampled estimate; KL exact: summed over the "
             "vocabulary along the same completions; reward: the reward model's P(positive), −1 without EOS; "
             "judge: the independent judge's P(positive) of every completion; held-out NLL: nats per token on "
             f"{args.heldout} test reviews; distinct-2: distinct bigrams / bigrams of the completions.", "",
             "| setup | KL | KL exact | reward | judge | held-out NLL | distinct-2 | finished | length |",
             "|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        lines.append(f"| {t['setup']} | {format_mean(t['kl'], t['kl_spread'])} | "
                     f"{format_mean(t['kl_exact'], t['kl_exact_spread'])} | "
                     f"{format_mean(t['reward'], t['reward_spread'], sign=True)} | "
                     f"{format_mean(t['judge'], t['judge_spread'])} | "
                     f"{t['heldout_nll']:.3f} | {t['distinct_2']:.3f} | {t['finished']:.2f} | {t['length']:.1f} |")
    lines += ["", f"SPEC §2's table, on the reference's {args.n_reference} eval prompts (all from negative reviews):",
              "", "| setup | KL | reward | finished |", "|---|---|---|---|"]
    lines += [f"| {t['setup']} | {format_mean(t['kl'], t['kl_spread'])} | "
              f"{format_mean(t['reward'], t['reward_spread'], sign=True)} | {t['finished']:.2f} |" for t in reference]
    return lines


def stages_markdown(done, evals, table, seeds, main):
    """The models' own scores, the diagnosis and the signal, and sample completions (lines)."""
    sft, rm, judge = done["sft"]["result"], done["reward"]["result"], done["judge"]["result"]
    lines = ["", f"Reward model: test accuracy {rm['test_accuracy']:.4f} on {rm['test_reviews']} IMDB test reviews; "
                 f"judge: {judge['test_accuracy']:.4f}; SFT policy: test perplexity {sft['test_perplexity']:.1f} on "
                 f"{sft['test_reviews']} test reviews."]
    if "diagnose" in done:
        lines += ["", "Diagnosis (the SFT model's completions and the classifiers on texts of their length):", ""]
        lines += [f"- {k}: {v}" for k, v in done["diagnose"]["result"].items()]
    if "signal" in done:
        lines += ["", "Policy-gradient signal at the SFT model: cosine between the gradients of independent batches "
                      "of 128 completions (RLOO, k = 4), by reward:", ""]
        lines += [f"- {k}: {v}" for k, v in done["signal"]["result"].items()]
    samples = {t["model"]: next(r for r in evals[0]["rows"] if r["model"] == t["model"]).get("samples", [])
               for t in table}
    if samples.get("sft") and samples.get(f"{main}/iter_2/liti"):
        lines += ["", f"Sample completions, seed {seeds[0]} (prompt in bold):", ""]
        for a, b in zip(samples["sft"], samples[f"{main}/iter_2/liti"]):
            lines += [f"- **{a['prompt']}** SFT: {a['completion']!r} · WARP I=2: {b['completion']!r}"]
    return lines


def claims_markdown(found):
    """The claims table (lines)."""
    return ["", "| claim | numbers | verdict |", "|---|---|---|"] + \
        [f"| {c['name']} | {'; '.join(n for n in c['numbers'] if n)} | {c['verdict']} |" for c in found]


def times_markdown(stages, times, first_seed):
    """Each stage's seconds, the side-by-side groups' wall times, and the totals (lines)."""
    lines = ["", "| stage | seconds |", "|---|---|"] + [f"| {k} | {v:.0f} |" for k, v in times.items()]
    shared = [n for n in times if not n.startswith("seed_")]
    first = shared + [n for n in times if n.startswith(f"seed_{first_seed}/")]
    groups = {r["side_by_side"]["group"]: r["side_by_side"]["wall"]
              for r in stages.done.values() if "side_by_side" in r}
    lines += [f"| {group}, side by side (wall time) | {wall:.0f} |" for group, wall in groups.items()]
    return lines + [f"| total, one seed (shared stages + seed {first_seed}) | {stages.wall_time(first):.0f} |",
                    f"| total | {stages.wall_time(list(times)):.0f} |"]


def plot_results(evaluation, done, seed, path, setting="fast"):
    """Three planes against KL to the SFT model (the reward model's reward, the judge's P(positive),
    the held-out NLL): the main job's WARP models I = 1.. and their path from the SFT model, each
    iteration's LITI sweep SFT → SLERP_i, the runs, the other WARP job, LERP, the fixed anchor and
    best-of-N of the SFT model; and the training reward per RL step. Returns False without matplotlib."""
    try:
        from matplotlib.figure import Figure  # optional: pip install matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    main, jobs = SETTINGS[setting]["main"], SETTINGS[setting]["jobs"]
    rows = {r["model"]: r for r in evaluation["rows"]}
    fig = Figure(figsize=(13, 9), layout="constrained")
    axes = fig.subplot_mosaic([["reward", "judge"], ["nll", "train"]])
    n_iter = job_iterations(evaluation["rows"], main)
    draw = []
    for i in range(1, n_iter + 1):  # each iteration's sweep, and its runs in the same colour
        color = f"C{i - 1}"
        draw += [(f"{main}/iter_{i}/slerp", ".-", dict(color=color, label=f"LITI sweep SFT → SLERP, iteration {i}"))]
        draw += [([f"{main}/iter_{i}/run_{m}"], "x", dict(color=color, label=None if m else f"RL runs, iteration {i}"))
                 for m in (0, 1)]
    draw += [(f"{main}/iter_1/lerp", ":", dict(color="olive", label="LITI sweep SFT → LERP, iteration 1")),
             ("fixed_anchor/iter_1/slerp", "--", dict(color="gray", label="LITI sweep SFT → SLERP, fixed anchor"))]
    warp = ["sft"] + [f"{main}/iter_{i}/liti" for i in range(1, n_iter + 1)]
    draw += [(warp, "ko-", dict(lw=1, label=f"{JOB_LABELS[main]}: SFT, I = 1..{n_iter}", note_offset=(5, -12),
                                note_size=8, notes=[None] + [f"I={k}" for k in range(1, n_iter + 1)]))]
    for job in (j for j in jobs if j in JOB_LABELS and j != main):  # the other WARP job, as a path
        other = ["sft"] + [m for m in (f"{job}/iter_{i}/liti" for i in range(1, 4)) if m in rows]
        draw += [(other, "s--", dict(color="purple", lw=1, label=f"{JOB_LABELS[job]}: SFT, I = 1..{len(other) - 1}"))]
    bon = best_of_models(evaluation["rows"])
    draw += [(bon, "^--", dict(color="red", lw=1, ms=4, label="best-of-N of SFT (N = 1, 2, 4, ...)"))] if bon else []
    labels = {"reward": "reward model: P(positive), −1 without EOS", "judge": "judge: P(positive) (never trained on)",
              "heldout_nll": "held-out NLL (nats/token; lower = less forgotten)"}
    for key, ax in (("reward", axes["reward"]), ("judge", axes["judge"]), ("heldout_nll", axes["nll"])):
        kl_reward_plane(ax, evaluation["rows"], key, draw)  # best-of-N has no held-out NLL: not drawn there
        ax.set(xlabel="KL(π ‖ π_SFT)", ylabel=labels[key])
        ax.grid(alpha=0.3)
    axes["reward"].set_title(f"KL–reward, {rows['sft']['n']} eval prompts, seed {seed}")
    axes["judge"].set_title("the same completions, scored by the independent judge")
    sft_judge, target = rows["sft"]["judge"], SETTINGS[setting]["judge_target"]  # the target in view
    line = axes["judge"].axhline(sft_judge + target, color="red", ls=":", lw=1,
                                 label=f"target: the SFT model's + {target:.2f}")
    axes["judge"].legend(handles=[line], fontsize=7, loc="upper left")
    axes["nll"].set_title("forgetting: NLL of held-out real reviews")
    axes["reward"].legend(fontsize=7, loc="lower right")
    training_reward(axes["train"], done, seed, [j for j in jobs if j in JOB_LABELS])
    fig.savefig(path, dpi=90)
    return True


def training_reward(ax, done, seed, jobs):
    """The training reward of every RL step of seed's WARP jobs `jobs`, iterations one after the other."""
    for job, color in zip(jobs, ("black", "purple")):
        key = f"seed_{seed}/{job}"
        if key not in done:
            continue
        offset = 0
        for i, runs in sorted(done[key]["result"]["metrics"].items(), key=lambda kv: int(kv[0])):
            for m, run in sorted(runs.items()):
                steps = np.arange(offset + 1, offset + len(run["reward"]) + 1)
                ax.plot(steps, run["reward"], color=color, alpha=0.8 if m == "0" else 0.4, lw=1,
                        label=f"{job}" if (i, m) == ("1", "0") else None)
            offset += len(run["reward"])
            ax.axvline(offset + 0.5, color="gray", lw=0.5)
    ax.set(xlabel="RL step (iterations one after the other)", ylabel="training reward (reward model)",
           title="RL training: both runs of each iteration")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
