"""
The paper's claims, checked on the evaluations of a reproduction (reproduce.py): each claim is a
difference between models measured in every seed, summarised by its mean and sample standard
deviation over the seeds, with a verdict ("holds" when the mean has the claimed sign and lies more
than 2 standard errors from 0).

The inputs are the evaluations of reproduce.py's seeds: {"rows": [...], "geometry": {...}} each,
a row per model or LITI sweep point (`model`, `kl`, `reward`, `judge`, `heldout_nll`, ...; sweep
points also `sweep` and `eta`), and the task vectors' geometry per iteration
(merging.task_vector_stats). The models are named as reproduce.py's jobs lay them out:
`{job}/iter_{i}/{run_m,slerp,liti,lerp}` for the main job (`reinforce` in the fast setting, `rloo` in
the sentiment one), `fixed_anchor/...`, `sft`, and best-of-N of the SFT model `best-of-N` (`best_of`).

Each claim about reward is measured twice: in the reward model's terms (what RL optimised) and in
the independent judge's (what the reviews became); the second carries "(judge)" in its name.
"""

import math

import numpy as np

from nanowarp.evaluate import best_of_n_kl


def mean_spread(values):
    """(mean, sample standard deviation) over seeds; the deviation is None for one seed."""
    values = np.asarray(values, dtype=float)
    return float(values.mean()), (float(values.std(ddof=1)) if len(values) > 1 else None)


def format_mean(mean, spread, digits=3, sign=False):
    """'mean ± spread' (just 'mean' when spread is None), `digits` decimals, a sign with sign=True."""
    if round(mean, digits) == 0:
        mean = 0.0  # "0.000", not "-0.000"
    text = f"{mean:+.{digits}f}" if sign else f"{mean:.{digits}f}"
    return text + (f" ± {spread:.{digits}f}" if spread is not None else "")


def summary(values, sign=False):
    """format_mean of values' mean and spread over seeds."""
    return format_mean(*mean_spread(values), sign=sign)


def sweep_points(rows, sweep, by="kl", y="reward", x="kl"):
    """(x, y) = (KL, reward) (or other columns) of a LITI sweep's points, in order of KL (or of eta,
    by="eta"): the sweep's front."""
    return [(r[x], r[y]) for r in sorted((r for r in rows if r.get("sweep") == sweep), key=lambda r: r[by])]


def runs_trajectory(rows, job, y="reward", x="kl"):
    """(x, y) of the RL runs of every iteration of a job, in order of x: where RL alone took the policy."""
    return sorted((r[x], r[y]) for r in rows if r["model"].startswith(job + "/") and "/run_" in r["model"])


def front_gain(lower, upper):
    """How far front `upper` lies above front `lower`: the mean over upper's points, within lower's
    KL range, of upper's reward minus lower's reward interpolated at the same KL (None if no overlap)."""
    kl_low, r_low = np.array([p[0] for p in lower]), np.array([p[1] for p in lower])
    gains = [r - np.interp(kl, kl_low, r_low) for kl, r in upper if kl_low.min() <= kl <= kl_low.max()]
    return float(np.mean(gains)) if gains else None


def sweep_gain(rows, lower, upper, y="reward"):
    """front_gain of LITI sweep `upper` over LITI sweep `lower` (their names), in column y."""
    return front_gain(sweep_points(rows, lower, y=y), sweep_points(rows, upper, y=y))


def verdict(values, claimed_sign=+1):
    """'holds' when the mean over seeds has the claimed sign and is 2 standard errors from 0,
    'does not hold' when it is that far on the other side, else 'inconclusive'."""
    values = [v for v in values if v is not None]
    if not values:
        return "not measured"
    mean, spread = mean_spread(values)
    if spread is None:
        return "one seed: " + ("the claimed sign" if claimed_sign * mean > 0 else "the opposite sign")
    se = spread / math.sqrt(len(values))
    if claimed_sign * mean > 2 * se:
        return "holds"
    return "does not hold" if claimed_sign * mean < -2 * se else "inconclusive (within 2 standard errors)"


def claims(evals, main="reinforce"):
    """The paper's claims about the main WARP job `main`, each with its numbers over seeds (a list of
    dicts): in the reward model's terms, then those about reward again in the judge's."""
    return reward_claims(evals, main, "reward") + reward_claims(evals, main, "judge")


def reward_claims(evals, main, y):
    """The claims measured in column `y` (reward: the reward model's, every claim; judge: the judge's
    P(positive), the claims about reward alone, named with "(judge)")."""
    out, judged = [], y == "judge"
    suffix = " (judge)" if judged else ""

    def value(rows, model, key):
        return next(r[key] for r in rows if r["model"] == model)

    def add(name, claim, numbers, values, sign=+1):
        out.append(dict(name=name + suffix, claim=claim, numbers=numbers, verdict=verdict(values, sign)))

    def is_run(row):  # an RL run of the main job, any iteration
        return row["model"].startswith(main + "/") and "/run_" in row["model"]

    word = "judge" if judged else "reward"  # the column's name in the numbers

    rows = [e["rows"] for e in evals]
    geo = [e["geometry"] for e in evals]
    m = main

    # 1. the merge against the runs it merges, iteration 1
    d_y = [value(r, f"{m}/iter_1/slerp", y) - np.mean([value(r, f"{m}/iter_1/run_{k}", y) for k in (0, 1)])
           for r in rows]
    d_kl = [value(r, f"{m}/iter_1/slerp", "kl") - np.mean([value(r, f"{m}/iter_1/run_{k}", "kl") for k in (0, 1)])
            for r in rows]
    add("SLERP vs its runs", f"the SLERP of the M runs gets a higher {word} than the runs themselves (at a higher KL)",
        [f"{word} SLERP − mean of the 2 runs {summary(d_y, sign=True)}",
         f"KL SLERP − mean of the 2 runs {summary(d_kl, sign=True)}"], d_y)

    # 2. SLERP vs LERP on the same two runs of iteration 1
    d_y = [value(r, f"{m}/iter_1/slerp", y) - value(r, f"{m}/iter_1/lerp", y) for r in rows]
    d_kl = [value(r, f"{m}/iter_1/slerp", "kl") - value(r, f"{m}/iter_1/lerp", "kl") for r in rows]
    ratio_slerp = [g[f"{m}/iter_1"]["merge_norm_ratio"] for g in geo]
    ratio_lerp = [g[f"{m}/iter_1/lerp"]["merge_norm_ratio"] for g in geo]
    gain = [sweep_gain(r, f"{m}/iter_1/lerp", f"{m}/iter_1/slerp", y) for r in rows]
    add("SLERP vs LERP", f"SLERP of the runs' task vectors gets a higher {word} than LERP (at a higher KL), "
        "because it keeps their norm while LERP shrinks it",
        [f"{word} SLERP − LERP {summary(d_y, sign=True)}",
         f"KL SLERP − LERP {summary(d_kl, sign=True)}",
         f"‖δ_merge‖ / mean ‖δ_m‖: SLERP {summary(ratio_slerp)}, LERP {summary(ratio_lerp)}",
         f"front SLERP above front LERP at equal KL by {format_gain(gain)}"], d_y)

    # 3. the EMA anchor vs a fixed (SFT) anchor, iteration 1, same run seeds
    if all("fixed_anchor/iter_1" in g for g in geo):
        def runs_mean(r, job, key):
            return np.mean([value(r, f"{job}/iter_1/run_{k}", key) for k in (0, 1)])
        d_y = [runs_mean(r, m, y) - runs_mean(r, "fixed_anchor", y) for r in rows]
        d_kl = [runs_mean(r, m, "kl") - runs_mean(r, "fixed_anchor", "kl") for r in rows]
        gain = [sweep_gain(r, "fixed_anchor/iter_1/slerp", f"{m}/iter_1/slerp", y) for r in rows]
        add("EMA anchor vs fixed anchor", f"an EMA anchor lets the policy reach a higher {word} than the fixed SFT "
            "anchor (at a higher KL), and its LITI front is better",
            [f"{word} of the runs, EMA − fixed {summary(d_y, sign=True)}",
             f"KL of the runs, EMA − fixed {summary(d_kl, sign=True)}",
             f"front (SFT → SLERP) EMA above fixed at equal KL by {format_gain(gain)}"], d_y)

    # 4. the angle between task vectors of two runs
    if not judged:
        cos = [g[f"{m}/iter_1"]["cos"] for g in geo]
        cos_med = [g[f"{m}/iter_1"]["cos_per_tensor_median"] for g in geo]
        later = [g[k]["cos"] for g in geo for k in g if k != f"{m}/iter_1" and not k.endswith("lerp")]
        out.append(dict(name="cosine between task vectors",
                        claim="the task vectors of two RL runs from the same θ_init are far from parallel, so their "
                              "merge is not a copy of either (SLERP's premise)",
                        numbers=[f"cos(δ_1, δ_2), iteration 1, whole model {summary(cos)}, per-tensor median "
                                 f"{summary(cos_med)}",
                                 f"other iterations and jobs: {min(later):.3f} to {max(later):.3f}" if later else ""],
                        verdict="measured"))

    # 5. later iterations push the front up; the KL of the WARP model grows with I
    iterations = job_iterations(rows[0], m)
    numbers = []
    gains = [[sweep_gain(r, f"{m}/iter_{i}/slerp", f"{m}/iter_{i + 1}/slerp", y) for i in range(1, iterations)]
             for r in rows]  # [seed][i]
    for i in range(1, iterations):
        numbers.append(f"front {i + 1} above front {i} at equal KL by {format_gain([g[i - 1] for g in gains])}")
    best = [[max(p[1] for p in sweep_points(r, f"{m}/iter_{i}/slerp", y=y)) for r in rows]
            for i in range(1, iterations + 1)]  # [i][seed]
    numbers.append(f"highest {word} of each front: " + ", ".join(f"I={i + 1} {summary(b, sign=not judged)}"
                                                                  for i, b in enumerate(best)))
    per_seed = [np.mean([x for x in g if x is not None]) if any(x is not None for x in g) else None for g in gains]
    add("iterations push the front up", "each WARP iteration's LITI front (SFT → SLERP_i) lies above the previous "
        "one (the mean over iterations of the gain at equal KL, per seed)", numbers, per_seed)
    if not judged:
        kls = np.array([[value(r, f"{m}/iter_{i}/liti", "kl") for i in range(1, iterations + 1)] for r in rows])
        monotone = int((np.diff(kls, axis=1) > 0).all(axis=1).sum())
        add("KL grows with I", "the KL of the WARP model to the SFT model grows with the iterations (reference "
            f"report; verdict on KL(I={iterations}) − KL(I=1) per seed)",
            ["KL: " + ", ".join(f"I={i + 1} {summary(kls[:, i])}" for i in range(iterations)),
             f"increasing at every iteration in {monotone} of {len(rows)} seed(s)"], list(kls[:, -1] - kls[:, 0]))

    # 6. the independent judge: does WARP make the reviews more positive, beyond the reward model?
    last = f"{m}/iter_{iterations}/slerp"
    final = f"{m}/iter_{iterations}/liti"
    if not judged:
        d_judge = [value(r, final, "judge") - value(r, "sft", "judge") for r in rows]
        d_reward = [value(r, final, "reward") - value(r, "sft", "reward") for r in rows]
        add("the judge agrees", f"WARP I = {iterations} writes more positive reviews according to an independent "
            "judge it never trained on",
            [f"judge WARP − SFT {summary(d_judge, sign=True)}",
             f"reward-model reward WARP − SFT {summary(d_reward, sign=True)}"], d_judge)
    gain = [front_gain(runs_trajectory(r, m, y=y), sweep_points(r, last, y=y)) for r in rows]
    add("front above the RL runs", f"the LITI front of the last iteration (SFT → SLERP_{iterations}) lies "
        f"above the RL runs' own points (every run of every iteration) at equal KL, in {word}",
        [f"front above the runs at equal KL by {format_gain(gain)} ({word})"], gain)
    if any(r.get("best_of") for r in rows[0]):
        bon = [best_of_front(r, y) for r in rows]
        gain = [front_gain(b, [(value(r, final, "kl"), value(r, final, y))]) if b else None
                for b, r in zip(bon, rows)]
        add("WARP vs best-of-N", f"WARP I = {iterations} against best-of-N of the SFT model at the same KL (the "
            f"reference front; N interpolated in log N), in {word}",
            [f"WARP − best-of-N at equal KL {format_gain(gain)}"], gain)

    # 7. reward hacking: the judge's gain against the reward model's, as KL grows
    if not judged:
        def gain_ratios(r, keep):  # judge gain / reward gain over the SFT model of the kept rows, in order of KL
            r0, j0 = value(r, "sft", "reward"), value(r, "sft", "judge")
            return [(x["judge"] - j0) / (x["reward"] - r0) for x in sorted(r, key=lambda x: x["kl"])
                    if keep(x) and abs(x["reward"] - r0) > 1e-3]
        numbers = []
        for label, keep in (("RL runs", is_run),
                            (f"LITI front {iterations}", lambda x: x.get("sweep") == last and x["eta"] > 0),
                            ("best-of-N", lambda x: (x.get("best_of") or 0) > 1)):
            ratios = [gain_ratios(r, keep) for r in rows]
            lows = [q for per_seed in ratios for q in per_seed[:len(per_seed) // 2]]
            highs = [q for per_seed in ratios for q in per_seed[len(per_seed) // 2:]]
            if lows and highs:
                numbers.append(f"{label}: judge gain / reward-model gain {np.mean(lows):.2f} in the lower half of "
                               f"their KL, {np.mean(highs):.2f} in the upper half")
        out.append(dict(name="reward hacking", claim="as KL grows, the judge gains less than the reward model (the "
                        "policy exploits the reward model), and less so along the LITI front than along RL",
                        numbers=numbers, verdict="measured"))

    # 8. forgetting: held-out NLL at equal reward (or judge), the LITI front against the runs
    def nll_gain(r):  # mean over the runs' points of NLL(run) − NLL(front at the run's y)
        f = sorted((x[y], x["heldout_nll"]) for x in r if x.get("sweep") == last)
        ys, nll = np.array([p[0] for p in f]), np.array([p[1] for p in f])
        if np.any(np.diff(ys) <= 0):  # the front's y must grow along it to be read at a run's y
            return None
        gains = [x["heldout_nll"] - np.interp(x[y], ys, nll) for x in r if is_run(x) and ys.min() <= x[y] <= ys.max()]
        return float(np.mean(gains)) if gains else None
    forget = [nll_gain(r) for r in rows]
    nll_sft = [value(r, "sft", "heldout_nll") for r in rows]
    nll_warp = [value(r, final, "heldout_nll") for r in rows]
    add("less forgetting", f"at equal {word}, the LITI front forgets less of the SFT language model than the RL runs "
        "(lower held-out NLL)", [f"held-out NLL, runs − front at equal {word} {format_gain(forget)} nats/token",
                                 f"SFT {summary(nll_sft)}, WARP I = {iterations} {summary(nll_warp)}"],
        forget)
    return out


def best_of_front(rows, y="reward"):
    """(KL, y) of best-of-N of the SFT model: its N = 1, 2, 4, ... rows joined linearly in log N, on a
    grid fine enough that front_gain's linear interpolation in KL follows that curve ([] without
    best-of-N rows)."""
    points = sorted((r["best_of"], r[y]) for r in rows if r.get("best_of"))
    if len(points) < 2:
        return []
    log_n = np.log([n for n, _ in points])
    grid = np.linspace(log_n[0], log_n[-1], 400)
    return [(best_of_n_kl(math.exp(g)), v) for g, v in zip(grid, np.interp(grid, log_n, [v for _, v in points]))]


def headline(evals, main):
    """What WARP did to sentiment, in one object: the final WARP policy's judge gain over the SFT model
    (mean over seeds), its standard error, its KL to the SFT model, and the share of best-of-N's judge
    gain at the same KL that it reaches (bon_fraction; None outside best-of-N's KL range or without it).

    judge_gain_se: the larger of two standard errors of the mean gain, over seeds (their spread / √S,
    S > 1) and over prompts (√Σ_s (se_warp,s² + se_sft,s²) / S, ignoring the common random numbers'
    correlation, which only lowers it): the second alone with one seed."""
    rows = [e["rows"] for e in evals]
    final = f"{main}/iter_{job_iterations(rows[0], main)}/liti"

    def row(r, model):
        return next(x for x in r if x["model"] == model)

    gains = [row(r, final)["judge"] - row(r, "sft")["judge"] for r in rows]
    prompt_se = math.sqrt(sum(row(r, final)["judge_se"] ** 2 + row(r, "sft")["judge_se"] ** 2 for r in rows)) / len(rows)
    seed_se = float(np.std(gains, ddof=1)) / math.sqrt(len(gains)) if len(gains) > 1 else 0.0
    kl = float(np.mean([row(r, final)["kl"] for r in rows]))
    bon = [best_of_front(r, "judge") for r in rows]
    fraction = None
    if all(bon) and bon[0][0][0] <= kl <= bon[0][-1][0]:
        bon_gain = np.mean([np.interp(kl, [p[0] for p in b], [p[1] for p in b]) - row(r, "sft")["judge"]
                            for b, r in zip(bon, rows)])
        fraction = float(np.mean(gains) / bon_gain) if bon_gain > 0 else None
    return dict(model=final, judge_gain=float(np.mean(gains)), judge_gain_se=max(seed_se, prompt_se),
                judge_gain_se_seeds=seed_se if len(gains) > 1 else None, judge_gain_se_prompts=prompt_se,
                bon_fraction=fraction, kl=kl, seeds=len(rows))


def format_gain(values):
    """format_mean of the mean and spread of front_gain's values over seeds, None values left out."""
    values = [v for v in values if v is not None]
    return summary(values, sign=True) if values else "n/a (the fronts' KL ranges do not overlap)"


def job_iterations(rows, job):
    """The iterations of `job` the rows hold models of."""
    return max(int(r["model"].split("/")[1].split("_")[1]) for r in rows if r["model"].startswith(job + "/"))

