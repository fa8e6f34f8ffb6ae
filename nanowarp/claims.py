"""
The paper's claims, checked on the evaluations of a reproduction (reproduce.py): each claim is a
difference between models measured in every seed, summarised by its mean and sample standard
deviation over the seeds, with a verdict ("holds" when the mean has the claimed sign and lies more
than 2 standard errors from 0).

The inputs are the evaluations of reproduce.py's seeds: {"rows": [...], "geometry": {...}} each,
a row per model or LITI sweep point (`model`, `kl`, `reward`, `judge`, `heldout_nll`, ...; sweep
points also `sweep` and `eta`), and the task vectors' geometry per iteration
(merging.task_vector_stats). The models are named as reproduce.py's jobs lay them out:
`reinforce/iter_{i}/{run_m,slerp,liti,lerp}`, `rloo/...`, `fixed_anchor/...`, `sft`.
"""

import math

import numpy as np


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


def runs_trajectory(rows, job="reinforce", y="reward", x="kl"):
    """(x, y) of the RL runs of every iteration of a job, in order of x: where RL alone took the policy."""
    return sorted((r[x], r[y]) for r in rows if r["model"].startswith(job + "/") and "/run_" in r["model"])


def front_gain(lower, upper):
    """How far front `upper` lies above front `lower`: the mean over upper's points, within lower's
    KL range, of upper's reward minus lower's reward interpolated at the same KL (None if no overlap)."""
    kl_low, r_low = np.array([p[0] for p in lower]), np.array([p[1] for p in lower])
    gains = [r - np.interp(kl, kl_low, r_low) for kl, r in upper if kl_low.min() <= kl <= kl_low.max()]
    return float(np.mean(gains)) if gains else None


def sweep_gain(rows, lower, upper):
    """front_gain of LITI sweep `upper` over LITI sweep `lower` (their names)."""
    return front_gain(sweep_points(rows, lower), sweep_points(rows, upper))


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


def claims(evals):
    """The paper's claims, each with its numbers over seeds (a list of dicts)."""
    out = []

    def value(rows, model, key):
        return next(r[key] for r in rows if r["model"] == model)

    def add(name, claim, numbers, values, sign=+1):
        out.append(dict(name=name, claim=claim, numbers=numbers, verdict=verdict(values, sign)))

    def is_run(row):  # an RL run of the REINFORCE job, any iteration
        return row["model"].startswith("reinforce/") and "/run_" in row["model"]

    rows = [e["rows"] for e in evals]
    geo = [e["geometry"] for e in evals]

    # 1. the merge against the runs it merges, iteration 1
    d_reward = [value(r, "reinforce/iter_1/slerp", "reward") - np.mean([value(r, f"reinforce/iter_1/run_{m}", "reward")
                                                                       for m in (0, 1)]) for r in rows]
    d_kl = [value(r, "reinforce/iter_1/slerp", "kl") - np.mean([value(r, f"reinforce/iter_1/run_{m}", "kl")
                                                               for m in (0, 1)]) for r in rows]
    add("SLERP vs its runs", "the SLERP of the M runs gets a higher reward than the runs themselves (at a higher KL)",
        [f"reward SLERP − mean of the 2 runs {summary(d_reward, sign=True)}",
         f"KL SLERP − mean of the 2 runs {summary(d_kl, sign=True)}"], d_reward)

    # 2. SLERP vs LERP on the same two runs of iteration 1
    d_reward = [value(r, "reinforce/iter_1/slerp", "reward") - value(r, "reinforce/iter_1/lerp", "reward") for r in rows]
    d_kl = [value(r, "reinforce/iter_1/slerp", "kl") - value(r, "reinforce/iter_1/lerp", "kl") for r in rows]
    ratio_slerp = [g["reinforce/iter_1"]["merge_norm_ratio"] for g in geo]
    ratio_lerp = [g["reinforce/iter_1/lerp"]["merge_norm_ratio"] for g in geo]
    gain = [sweep_gain(r, "reinforce/iter_1/lerp", "reinforce/iter_1/slerp") for r in rows]
    add("SLERP vs LERP", "SLERP of the runs' task vectors gets a higher reward than LERP (at a higher KL), "
        "because it keeps their norm while LERP shrinks it",
        [f"reward SLERP − LERP {summary(d_reward, sign=True)}",
         f"KL SLERP − LERP {summary(d_kl, sign=True)}",
         f"‖δ_merge‖ / mean ‖δ_m‖: SLERP {summary(ratio_slerp)}, LERP {summary(ratio_lerp)}",
         f"front SLERP above front LERP at equal KL by {format_gain(gain)}"], d_reward)

    # 3. the EMA anchor vs a fixed (SFT) anchor, iteration 1, same run seeds
    if all("fixed_anchor/iter_1" in g for g in geo):
        def runs_mean(r, job, key):
            return np.mean([value(r, f"{job}/iter_1/run_{m}", key) for m in (0, 1)])
        d_reward = [runs_mean(r, "reinforce", "reward") - runs_mean(r, "fixed_anchor", "reward") for r in rows]
        d_kl = [runs_mean(r, "reinforce", "kl") - runs_mean(r, "fixed_anchor", "kl") for r in rows]
        gain = [sweep_gain(r, "fixed_anchor/iter_1/slerp", "reinforce/iter_1/slerp") for r in rows]
        add("EMA anchor vs fixed anchor", "an EMA anchor lets the policy reach a higher reward than the fixed SFT "
            "anchor (at a higher KL), and its LITI front is better",
            [f"reward of the runs, EMA − fixed {summary(d_reward, sign=True)}",
             f"KL of the runs, EMA − fixed {summary(d_kl, sign=True)}",
             f"front (SFT → SLERP) EMA above fixed at equal KL by {format_gain(gain)}"], d_reward)

    # 4. the angle between task vectors of two runs
    cos = [g["reinforce/iter_1"]["cos"] for g in geo]
    cos_med = [g["reinforce/iter_1"]["cos_per_tensor_median"] for g in geo]
    later = [g[k]["cos"] for g in geo for k in g if k != "reinforce/iter_1" and not k.endswith("lerp")]
    out.append(dict(name="cosine between task vectors",
                    claim="the task vectors of two RL runs from the same θ_init are far from parallel, so their "
                          "merge is not a copy of either (SLERP's premise)",
                    numbers=[f"cos(δ_1, δ_2), iteration 1, whole model {summary(cos)}, per-tensor median "
                             f"{summary(cos_med)}",
                             f"other iterations and jobs: {min(later):.3f} to {max(later):.3f}" if later else ""],
                    verdict="measured"))

    # 5. later iterations push the front up; the KL of the WARP model grows with I
    iterations = job_iterations(rows[0], "reinforce")
    numbers = []
    gains = [[sweep_gain(r, f"reinforce/iter_{i}/slerp", f"reinforce/iter_{i + 1}/slerp") for i in range(1, iterations)]
             for r in rows]  # [seed][i]
    for i in range(1, iterations):
        numbers.append(f"front {i + 1} above front {i} at equal KL by {format_gain([g[i - 1] for g in gains])}")
    best = [[max(p[1] for p in sweep_points(r, f"reinforce/iter_{i}/slerp")) for r in rows]
            for i in range(1, iterations + 1)]  # [i][seed]
    numbers.append("highest reward of each front: " + ", ".join(f"I={i + 1} {summary(b, sign=True)}"
                                                                 for i, b in enumerate(best)))
    per_seed = [np.mean([x for x in g if x is not None]) if any(x is not None for x in g) else None for g in gains]
    add("iterations push the front up", "each WARP iteration's LITI front (SFT → SLERP_i) lies above the previous "
        "one (the mean over iterations of the gain at equal KL, per seed)", numbers, per_seed)
    kls = np.array([[value(r, f"reinforce/iter_{i}/liti", "kl") for i in range(1, iterations + 1)] for r in rows])
    monotone = int((np.diff(kls, axis=1) > 0).all(axis=1).sum())
    add("KL grows with I", "the KL of the WARP model to the SFT model grows with the iterations (reference report; "
        f"verdict on KL(I={iterations}) − KL(I=1) per seed)",
        ["KL: " + ", ".join(f"I={i + 1} {summary(kls[:, i])}" for i in range(iterations)),
         f"increasing at every iteration in {monotone} of {len(rows)} seed(s)"], list(kls[:, -1] - kls[:, 0]))

    # 6. the independent judge: does WARP make the reviews more positive, beyond the reward model?
    last = f"reinforce/iter_{iterations}/slerp"
    warp2 = "reinforce/iter_2/liti" if iterations >= 2 else "reinforce/iter_1/liti"
    d_judge = [value(r, warp2, "judge") - value(r, "sft", "judge") for r in rows]
    d_reward = [value(r, warp2, "reward") - value(r, "sft", "reward") for r in rows]
    add("the judge agrees", f"WARP I = {warp2.split('/')[1][5:]} writes more positive reviews according to an "
        "independent judge it never trained on (target: +0.30 over the SFT model)",
        [f"judge WARP − SFT {summary(d_judge, sign=True)}",
         f"reward-model reward WARP − SFT {summary(d_reward, sign=True)}"], d_judge)
    gain = [front_gain(runs_trajectory(r, y="judge"), sweep_points(r, last, y="judge")) for r in rows]
    add("front above the RL runs (judge)", f"the LITI front of the last iteration (SFT → SLERP_{iterations}) lies "
        "above the RL runs' own points (every run of every iteration) at equal KL, in judge reward",
        [f"front above the runs at equal KL by {format_gain(gain)} (judge)",
         "in reward-model reward: " + format_gain([front_gain(runs_trajectory(r), sweep_points(r, last)) for r in rows])],
        gain)

    # 7. reward hacking: the judge's gain against the reward model's, as KL grows
    def gain_ratios(r, keep):  # judge gain / reward gain over the SFT model of the kept rows, in order of KL
        r0, j0 = value(r, "sft", "reward"), value(r, "sft", "judge")
        return [(x["judge"] - j0) / (x["reward"] - r0) for x in sorted(r, key=lambda x: x["kl"])
                if keep(x) and abs(x["reward"] - r0) > 1e-3]
    numbers = []
    for label, keep in (("RL runs", is_run),
                        (f"LITI front {iterations}", lambda x: x.get("sweep") == last and x["eta"] > 0)):
        ratios = [gain_ratios(r, keep) for r in rows]
        lows = [q for per_seed in ratios for q in per_seed[:len(per_seed) // 2]]
        highs = [q for per_seed in ratios for q in per_seed[len(per_seed) // 2:]]
        if lows and highs:
            numbers.append(f"{label}: judge gain / reward-model gain {np.mean(lows):.2f} in the lower half of their "
                           f"KL, {np.mean(highs):.2f} in the upper half")
    out.append(dict(name="reward hacking", claim="as KL grows, the judge gains less than the reward model (the policy "
                    "exploits the reward model), and less so along the LITI front than along RL",
                    numbers=numbers, verdict="measured"))

    # 8. forgetting: held-out NLL at equal reward, the LITI front against the runs
    def nll_gain(r):  # mean over the runs' points of NLL(run) − NLL(front at the run's reward)
        f = sorted((x["reward"], x["heldout_nll"]) for x in r if x.get("sweep") == last)
        rw, nll = np.array([p[0] for p in f]), np.array([p[1] for p in f])
        gains = [x["heldout_nll"] - np.interp(x["reward"], rw, nll) for x in r
                 if is_run(x) and rw.min() <= x["reward"] <= rw.max()]
        return float(np.mean(gains)) if gains else None
    forget = [nll_gain(r) for r in rows]
    nll_sft = [value(r, "sft", "heldout_nll") for r in rows]
    nll_warp = [value(r, f"reinforce/iter_{iterations}/liti", "heldout_nll") for r in rows]
    add("less forgetting", "at equal reward, the LITI front forgets less of the SFT language model than the RL runs "
        "(lower held-out NLL)", [f"held-out NLL, runs − front at equal reward {format_gain(forget)} nats/token",
                                 f"SFT {summary(nll_sft)}, WARP I = {iterations} {summary(nll_warp)}"],
        forget)
    return out


def format_gain(values):
    """format_mean of the mean and spread of front_gain's values over seeds, None values left out."""
    values = [v for v in values if v is not None]
    return summary(values, sign=True) if values else "n/a (the fronts' KL ranges do not overlap)"


def job_iterations(rows, job):
    """The iterations of `job` the rows hold models of."""
    return max(int(r["model"].split("/")[1].split("_")[1]) for r in rows if r["model"].startswith(job + "/"))

