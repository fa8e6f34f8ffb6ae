"""
A cheap yardstick of how well RL spends its KL on signal (docs/reproduction.md#the-yardstick): one
WARP iteration of the sentiment setting, shortened (M = 2 runs of T steps, seeds S and S + 1, μ = 1/T),
on the reproduction's own models; then, on the eval prompts (each twice), the judge's gain over the
SFT model, the exact KL to it, the gain per unit of KL, the share of best-of-N's judge gain at the
same KL, for each run and for their SLERP, and the cosine of the two runs' task vectors.

    python reproduce.py --setting sentiment --source aclImdb_v1.tar.gz   # the models (stages 1-6)
    python -m nanowarp.study.yardstick --name base
    python -m nanowarp.study.yardstick --name lr1e-2 -- --lr 1e-2        # after --: train.py's flags

Each call appends a row to OUT/yardstick/rows.jsonl and prints the table of every row so far; the
best-of-N reference (N = 1, 2, 4, 8 of the SFT model, the same prompts) is computed once and kept.
With --iterations I > 1 the job runs I WARP iterations, and each one's LITI θ_init is judged too:
the front WARP's iterations climb, against best-of-N's (`--steps 600 --iterations 2` is the
sentiment setting's seed job itself); --best_of extends the best-of-N front past N = 8 to read them
against. A row's name is its key: the same name again with the same settings reuses the row (its job
and its judged models, nothing trained or judged again) to print it against another front.
"""

import datetime
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass

import torch

from nanowarp.config import flag, parse_args
from nanowarp.data import load_prompts
from nanowarp.evaluate import best_of_n, evaluate
from nanowarp.merging import task_vector_stats
from nanowarp.models import from_config, from_pretrained, load_theta
from nanowarp.reward import Reward, RewardModel
from nanowarp.tokenizer import load_tokenizer
from nanowarp.warp import warp

BEST_OF = (1, 2, 4, 8)


@dataclass
class Args:
    name: str = flag(None, "the row's name: OUT/yardstick/NAME holds its WARP job", required=True)
    out_dir: str = flag("runs/sentiment", "the sentiment reproduction's folder: sft, reward_model, judge, data")
    steps: int = flag(300, "T: RL steps of each of the two runs (the sentiment setting's 600 halved)")
    seed: int = flag(0, "train.py --seed: the runs' seeds are S and S + 1")
    iterations: int = flag(1, "I: WARP iterations; past 1, each iteration's LITI θ_init is judged too")
    n_prompts: int = flag(1000, "eval prompts, each completed twice")
    threads: int = flag(1, "CPU threads of the evaluation and of best-of-N (the runs take one each, side by side); "
                           "the numbers are bit for bit those of a thread count, and every row so far used 1")
    best_of: tuple = flag(BEST_OF, "the best-of-N front: N completions per prompt of the SFT model, the reward "
                                   "model keeps one (drawn once, the first N of max N; kept beside the rows)",
                          nargs="+", type=int, metavar="N")


def train_flags(args, extra):
    """train.py's flags of the row's job: --preset tiny_sentiment, I iterations (one by default) of two runs
    of T steps with μ·T = 1, then the flags after `--` (which win)."""
    out = args.out_dir
    return ["--preset", "tiny_sentiment", "--policy", f"{out}/sft", "--reward_model", f"{out}/reward_model",
            "--data", f"{out}/data", "--out_dir", f"{out}/yardstick/{args.name}", "--iterations", str(args.iterations), "--runs", "2",
            "--steps", str(args.steps), "--ema_rate", repr(1 / args.steps), "--seed", str(args.seed),
            "--workers", "2", "--threads", "1", "--log_every", str(max(1, args.steps // 4)), *extra]


class Judging:
    """The SFT model, its tokenizer, the reward model, the judge and the eval prompts (each twice),
    loaded once; `row(theta)` evaluates a policy's weights as eval.py would (seed 0)."""

    def __init__(self, args, max_new_tokens, best_of=BEST_OF):
        out = args.out_dir
        self.ns = tuple(best_of)
        self.ref = from_pretrained(f"{out}/sft").eval()
        self.policy = from_config(self.ref.config).eval()
        self.tokenizer, self.eos = load_tokenizer(f"{out}/sft"), self.ref.config.eos_token_id
        self.prompts = load_prompts(f"{out}/data", "eval")[:args.n_prompts] * 2
        self.reward = Reward([RewardModel(f"{out}/reward_model", torch.device("cpu"), batch_size=64)])
        self.settings = dict(max_new_tokens=max_new_tokens, temperature=1.0, batch_size=64, seed=0,
                             judge=RewardModel(f"{out}/judge", torch.device("cpu"), batch_size=64))

    def row(self, theta):
        self.policy.load_hf_state_dict(theta)
        r = evaluate(self.policy, self.ref, self.reward, self.prompts, self.tokenizer, self.eos, **self.settings)
        return {k: r[k] for k in ("kl", "kl_exact", "kl_exact_se", "reward", "judge", "judge_se")}

    def best_of_n(self):
        return best_of_n(self.ref, self.reward, self.prompts, self.tokenizer, self.eos, self.ns, **self.settings)


def bon_gain(reference, kl):
    """Best-of-N's judge gain over N = 1 at `kl`, linear between its points (KL = log N − (N − 1)/N)."""
    points = [(r["kl"], r["judge"] - reference[0]["judge"]) for r in reference]
    for (k0, g0), (k1, g1) in zip(points, points[1:]):
        if kl <= k1:
            return g0 + (g1 - g0) * (kl - k0) / (k1 - k0)
    return None  # beyond the largest N's KL


def summary(row, reference):
    """The row's judge gain, KL and their ratio, for the runs (mean ± half their difference: the standard
    error of a mean of two) and for the SLERP, and best-of-N's fraction of each."""
    sft = reference[0]["judge"]
    out = {}
    for who, models in (("runs", ("run_0", "run_1")), ("slerp", ("slerp",))):
        gains = [row["models"][m]["judge"] - sft for m in models]
        kls = [row["models"][m]["kl_exact"] for m in models]
        per_kl = [g / k for g, k in zip(gains, kls)]
        per_root = [g / k ** 0.5 for g, k in zip(gains, kls)]
        bon = [g / b if (b := bon_gain(reference, k)) else None for g, k in zip(gains, kls)]
        mean = lambda v: sum(v) / len(v)  # noqa: E731
        half = lambda v: abs(v[0] - v[-1]) / 2  # noqa: E731
        out[who] = dict(gain=mean(gains), gain_se=half(gains), kl=mean(kls), per_kl=mean(per_kl),
                        per_kl_se=half(per_kl), per_root_kl=mean(per_root), per_root_kl_se=half(per_root),
                        bon_fraction=None if None in bon else mean(bon))
    return out


def table(rows, reference):
    """Markdown: one line per row, the runs then the SLERP."""
    def cell(x, fmt):
        return "n/a" if x is None else format(x, fmt)
    ns, kls = [str(r["best_of"]) for r in reference[1:]], [r["kl"] for r in reference[1:]]
    gains = [r["judge"] - reference[0]["judge"] for r in reference[1:]]
    lines = [f"best-of-N, N = {', '.join(ns)}: judge gain {', '.join(format(g, '+.3f') for g in gains)} at KL "
             f"{', '.join(format(k, '.3f') for k in kls)}; gain / √KL "
             f"{', '.join(format(g / k ** 0.5, '.3f') for g, k in zip(gains, kls))}", "",
             "| row | command: python -m nanowarp.study.yardstick ... | date | T | judge gain, runs | KL, runs | gain / KL, runs | gain / √KL, runs | of best-of-N, "
             "runs | judge gain, SLERP | KL, SLERP | gain / √KL, SLERP | of best-of-N, SLERP | cos(δ_1, δ_2) | min |",
             "|---" * 15 + "|"]
    for row in rows:
        s = summary(row, reference)
        r, m = s["runs"], s["slerp"]
        arguments = row["command"].removeprefix("python -m nanowarp.study.yardstick ")
        lines.append(f"| {row['name']} | `{arguments}` | {row['date']} | {row['steps']} | "
                     f"{r['gain']:+.3f} ± {r['gain_se']:.3f} | {r['kl']:.3f} | {r['per_kl']:.3f} ± {r['per_kl_se']:.3f} | "
                     f"{r['per_root_kl']:.3f} ± {r['per_root_kl_se']:.3f} | {cell(r['bon_fraction'], '.2f')} | "
                     f"{m['gain']:+.3f} | {m['kl']:.3f} | {m['per_root_kl']:.3f} | {cell(m['bon_fraction'], '.2f')} | "
                     f"{cell(row['cos'], '.3f')} | {row['minutes']:.1f} |")
    return "\n".join(lines)


def liti_lines(row, reference):
    """One line per iteration's LITI θ_init judged (liti_1, liti_2, ...): judge gain ± its standard error,
    exact KL, gain / √KL and the share of best-of-N's gain at that KL."""
    sft, lines = reference[0]["judge"], []
    for i in range(1, 1 + sum(name.startswith("liti_") for name in row["models"])):
        m = row["models"][f"liti_{i}"]
        gain, bon = m["judge"] - sft, bon_gain(reference, m["kl_exact"])
        per_root = "n/a" if m["kl_exact"] <= 0 else format(gain / m["kl_exact"] ** 0.5, ".3f")
        share = "n/a (beyond best-of-8's KL)" if bon is None else "n/a" if bon == 0 else format(gain / bon, ".2f")
        lines.append(f"{row['name']}, iteration {i}: judge gain {gain:+.3f} ± {m['judge_se']:.3f} at KL "
                     f"{m['kl_exact']:.3f}, gain / √KL {per_root}, of best-of-N {share}")
    return lines


def reference_name(args, max_new_tokens):
    """The file that keeps the best-of-N front of these prompts (the default N = 1, 2, 4, 8 keeps its old name)."""
    ns = sorted(set(args.best_of))
    tag = "" if tuple(ns) == BEST_OF else "_N" + "-".join(map(str, ns))
    return f"best_of_n_{args.n_prompts}x2_{max_new_tokens}{tag}.json"


SETTINGS = ("flags", "steps", "seed", "n_prompts", "iterations")  # what a row's name stands for


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    own, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = parse_args(own, Args, presets=None, description=__doc__)
    for folder in ("sft", "reward_model", "judge", "data"):
        if not os.path.isdir(os.path.join(args.out_dir, folder)):
            sys.exit(f"yardstick: {args.out_dir}/{folder} is missing: run `python reproduce.py --setting sentiment` "
                     f"first (its stages up to the judge), or give --out_dir")
    torch.set_num_threads(args.threads)
    root = os.path.join(args.out_dir, "yardstick")
    os.makedirs(root, exist_ok=True)
    cfg = parse_args(train_flags(args, extra))
    rows_path = os.path.join(root, "rows.jsonl")
    settings = dict(flags=extra, steps=args.steps, seed=args.seed, n_prompts=args.n_prompts, iterations=args.iterations)
    same = [r for r in (json.loads(line) for line in open(rows_path)) if r["name"] == args.name] \
        if os.path.exists(rows_path) else []
    if same and any({k: r.get(k, 1 if k == "iterations" else None) for k in SETTINGS} != settings for r in same):
        sys.exit(f"yardstick: the row {args.name!r} has other settings in {rows_path}: choose another --name")
    judging = None
    if same:
        row = same[-1]
        print(f"the row {args.name!r} is in {rows_path}: read against the best-of-N front below, not trained again")
    else:
        start = time.perf_counter()
        print("$ python train.py " + shlex.join(train_flags(args, extra)), flush=True)
        warp(cfg)
        minutes = (time.perf_counter() - start) / 60
        torch.set_num_threads(args.threads)  # warp() set the job's --threads
        judging = Judging(args, cfg.max_new_tokens, args.best_of)
        folder = os.path.join(cfg.out_dir, "iter_1")
        models = {m: judging.row(load_theta(os.path.join(folder, m))) for m in ("run_0", "run_1", "slerp")}
        if args.iterations > 1:  # the front the iterations climb
            for i in range(1, args.iterations + 1):
                models[f"liti_{i}"] = judging.row(load_theta(os.path.join(cfg.out_dir, f"iter_{i}", "liti")))
        stats = task_vector_stats(load_theta(cfg.policy), [load_theta(os.path.join(folder, f"run_{m}")) for m in (0, 1)],
                                  load_theta(os.path.join(folder, "slerp")))
        row = dict(name=args.name, **settings, date=datetime.date.today().isoformat(),
                   command="python -m nanowarp.study.yardstick " + shlex.join(argv), models=models, cos=stats["cos"],
                   minutes=minutes)
        with open(rows_path, "a") as f:
            f.write(json.dumps(row) + "\n")
    reference_path = os.path.join(root, reference_name(args, cfg.max_new_tokens))
    if not os.path.exists(reference_path):
        judging = judging or Judging(args, cfg.max_new_tokens, args.best_of)
        with open(reference_path, "w") as f:
            json.dump(judging.best_of_n(), f)
    reference = json.load(open(reference_path))
    rows = [json.loads(line) for line in open(os.path.join(root, "rows.jsonl"))]
    print(table([r for r in rows if r["n_prompts"] == args.n_prompts], reference))
    print("\n".join(liti_lines(row, reference)))


if __name__ == "__main__":
    main()
