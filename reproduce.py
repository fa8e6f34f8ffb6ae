"""
WARP on real IMDB reviews, on a laptop CPU, offline, in one command: tiny policy and reward model
trained from scratch, WARP with REINFORCE and RLOO, the evaluation, the table, the Pareto-front
plot, and the paper's claims checked, every stage timed.

    python reproduce.py --source ../shared/data/imdb/aclImdb_labeled.tar.gz                 # one seed
    python reproduce.py --source ../shared/data/imdb/aclImdb_labeled.tar.gz --seeds 0 1 2    # three

Only the models are small (nanowarp/tiny.py); every stage is the package's ordinary code path and
every model an ordinary checkpoint that train.py, merge.py and eval.py take:

  1. tokenizers  a byte-level BPE (policy) and a lowercase WordPiece (classifier), trained on the
                 training reviews with the `tokenizers` library, saved in the Hugging Face layout
  2. prepare     nanowarp.data.prepare: training prompts, the eval prompts, the labelled reviews
  3. sft         a tiny GPT-2 trained from scratch on the training reviews (EOS after each)
  4. reward      a tiny DistilBERT trained from scratch on the training labels
  for each seed s (WARP's --seed is 100·s: the job's run seeds never overlap another seed's):
  5. warp        train.py: REINFORCE (I = 3), RLOO k = 4 (I = 2), and the fixed-anchor ablation (I = 1)
  6. evaluate    KL to the SFT model and reward on the eval prompts, for every checkpoint, the LITI
                 sweep SFT → SLERP of each iteration, and the LERP of iteration 1's runs
  7. report      OUT/results.json, OUT/results.md and OUT/pareto.png (matplotlib, when installed)

A finished stage is recorded in OUT/stages.json and skipped when the command runs again, so an
interrupted reproduction resumes (a WARP job also resumes inside itself), and `--seeds 0 1 2` after
`--seeds 0` only adds seeds 1 and 2. Delete a stage's output folder to redo it: the stages computed
from it are then redone too (a seed's evaluation after its WARP jobs; every WARP job, from scratch,
after the SFT or reward model). Other sizes or budgets need another --out_dir (OUT/settings.json
holds the flags, and a change is refused).
"""

import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)  # run from anywhere without installing

import train  # noqa: E402  (train.main(argv) is `python train.py ARGV`)
from nanowarp import hub, merging, tiny  # noqa: E402
from nanowarp.config import Config, changed_flags, flag, parse_args as parse_flags  # noqa: E402
from nanowarp.hub import write_json  # noqa: E402
from nanowarp.data import IMDB_URL, DataError, clean, load_prompts, prepare, read_imdb  # noqa: E402
from nanowarp.evaluate import evaluate, liti_sweep  # noqa: E402
from nanowarp.gpt2 import GPT2  # noqa: E402
from nanowarp.reward import RewardModel  # noqa: E402
from nanowarp.supervised import train_reward_model, train_sft  # noqa: E402
from nanowarp.tokenizer import load_tokenizer  # noqa: E402
from nanowarp.warp import load_theta, resolve_device  # noqa: E402


@dataclass
class Args:
    source: str = flag(IMDB_URL, "IMDB: the official aclImdb_v1.tar.gz URL, a local copy, or the folder it extracts to")
    out_dir: str = flag("runs/tiny", "where everything goes")
    seeds: tuple = flag((0,), "WARP seeds (each adds its WARP jobs and evaluation); seed s is train.py --seed 100*s",
                        nargs="+", type=int)
    device: str = flag("auto", "cpu, cuda, cuda:N, or auto")
    threads: int = flag(1, "CPU threads per process; 0 = PyTorch's default. Models this small run faster on one "
                           "thread per process than on two")
    workers: int = flag(2, "processes side by side: the SFT and reward stages, and (train.py --workers) the M runs "
                           "of a WARP iteration")
    ablations: bool = flag(True, "also train the fixed-anchor WARP job (the EMA-vs-fixed-anchor claim)")
    # sizes and budgets; the defaults are nanowarp/tiny.py's
    policy_vocab: int = flag(tiny.POLICY_VOCAB, "BPE vocabulary of the policy")
    reward_vocab: int = flag(tiny.REWARD_VOCAB, "WordPiece vocabulary of the reward model")
    policy_layers: int = flag(tiny.GPT2_ARCH["n_layer"], "GPT-2 layers")
    policy_width: int = flag(tiny.GPT2_ARCH["n_embd"], "GPT-2 width (4 heads)")
    reward_layers: int = flag(tiny.DISTILBERT_ARCH["n_layers"], "DistilBERT layers")
    reward_width: int = flag(tiny.DISTILBERT_ARCH["dim"], "DistilBERT width (2 heads, FFN 4x wider)")
    sft_epochs: float = flag(tiny.SFT["epochs"], "passes over the training reviews of the SFT stage")
    reward_epochs: float = flag(tiny.REWARD["epochs"], "passes over the training reviews of the reward stage")
    steps: int = flag(tiny.WARP["steps"], "T: RL steps per WARP run")
    batch_size: int = flag(tiny.WARP["batch_size"], "completions per RL step")
    max_new_tokens: int = flag(tiny.WARP["max_new_tokens"], "completion length, in RL and evaluation")
    n_eval: int = flag(100, "eval prompts: the first N test reviews of at least 200 characters (SPEC §2)")
    etas: tuple = flag(tuple(round(i / 10, 10) for i in range(11)), "eta values of each LITI sweep, in [0, 1] "
                       "(as eval.py --etas)", nargs="+", type=float)
    ppl_reviews: int = flag(2500, "SFT perplexity on this many test reviews, evenly spaced; 0 = all")
    accuracy_reviews: int = flag(0, "reward-model accuracy on this many test reviews, evenly spaced; 0 = all 25,000")


def parse_args(argv=None):
    return parse_flags(argv, Args, presets=None, description=__doc__)


# ---- bookkeeping: one record per finished stage ------------------------------------------------

class Stages:
    """Runs the stages, prints the time of each, and records what they return in OUT/stages.json.
    A stage recorded there whose output still exists is skipped, unless a stage it is computed
    from (`after`) was redone since: then it is redone too."""

    def __init__(self, out_dir):
        self.path = os.path.join(out_dir, "stages.json")
        self.done = json.load(open(self.path)) if os.path.isfile(self.path) else {}
        self.ran = []  # stages this invocation ran

    def stale(self, name, after):
        """The stages among `after` redone since `name` was done: in this invocation, or later than
        it in an earlier one (every record holds the time it finished)."""
        mine = self.done.get(name, {}).get("finished_at")
        return [d for d in after if d in self.ran
                or (mine is not None and self.done.get(d, {}).get("finished_at", 0.0) > mine)]

    def is_done(self, name, output, after=()):
        if name in self.done and os.path.exists(output):
            redone = self.stale(name, after)
            if not redone:
                print(f"\n=== {name}: done earlier in {self.done[name]['seconds']:.0f}s, skipped", flush=True)
                return True
            print(f"\n=== {name}: done earlier, redone since {', '.join(redone)} changed", flush=True)
        return False

    def record(self, name, seconds, result, **extra):
        self.done[name] = dict(seconds=round(seconds, 1), result=result, finished_at=time.time(), **extra)
        self.ran.append(name)
        write_json(self.path, self.done)
        print(f"=== {name}: {seconds:.1f}s", flush=True)

    def __call__(self, name, output, fn, *fn_args, after=()):
        if not self.is_done(name, output, after):
            print(f"\n=== {name}", flush=True)
            self.record(name, *timed(fn, *fn_args))
        return self.done[name]["result"]

    def side_by_side(self, stages, workers, threads, after=()):
        """(name, output, fn, *fn_args) stages in `workers` processes at once (spawned: fn and its
        arguments are pickled); each stage's own time is recorded, and printed with the wall time."""
        todo = [s for s in stages if not self.is_done(*s[:2], after)]
        if workers <= 1 or len(todo) <= 1:
            for name, output, fn, *fn_args in todo:
                print(f"\n=== {name}", flush=True)
                self.record(name, *timed(fn, *fn_args))
            return
        print(f"\n=== {', '.join(s[0] for s in todo)}: side by side, one process each", flush=True)
        start = time.perf_counter()
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(min(workers, len(todo)), ctx,
                                                    initializer=torch.set_num_threads, initargs=(threads or 1,)) as pool:
            futures = [(name, pool.submit(timed, fn, *fn_args)) for name, _, fn, *fn_args in todo]
            results = [(name, *future.result()) for name, future in futures]
        wall, group = time.perf_counter() - start, " + ".join(s[0] for s in todo)
        for name, seconds, result in results:
            self.record(name, seconds, result, side_by_side=dict(group=group, wall=round(wall, 1)))
        print(f"=== {group}, side by side: {wall:.1f}s wall time", flush=True)

    def wall_time(self, names):
        """Seconds the stages took one after the other, a side-by-side group counted once, by its wall time."""
        groups = {self.done[n]["side_by_side"]["group"]: self.done[n]["side_by_side"]["wall"]
                  for n in names if "side_by_side" in self.done[n]}
        return sum(self.done[n]["seconds"] for n in names if "side_by_side" not in self.done[n]) + sum(groups.values())


# flags that change no result: a resumed reproduction may change them
RESUME_FREE = ("source", "out_dir", "seeds", "device", "threads", "workers")


def check_settings(args):
    """OUT/settings.json holds the flags of the reproduction in OUT; different ones are refused,
    since the stages done earlier would not be redone with them."""
    path = os.path.join(args.out_dir, "settings.json")
    settings = {k: v for k, v in dataclasses.asdict(args).items() if k not in RESUME_FREE}
    if os.path.isfile(path):
        differing = changed_flags(json.load(open(path)), settings)
        if differing:
            sys.exit(f"reproduce.py: error: {args.out_dir} holds a reproduction with other settings: "
                     f"{', '.join(differing)}. Use its settings to resume it, or another --out_dir")
    write_json(path, settings)


def timed(fn, *fn_args):
    start = time.perf_counter()
    result = fn(*fn_args)
    return time.perf_counter() - start, result


def rounded(obj, digits=4):
    """obj with every float rounded: results files a reader can diff."""
    if isinstance(obj, float):
        return round(obj, digits) + 0.0  # + 0.0: no "-0.0"
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return obj


# ---- stages 1-4: tokenizers, data, the SFT policy, the reward model -----------------------------

def train_tokenizers(args, folder):
    data = read_imdb(args.source, cache_dir=os.path.join(args.out_dir, "cache"))
    texts = [clean(text) for text, _ in data["train"]]
    n_positions = tiny.GPT2_ARCH["n_positions"]
    tiny.train_bpe(texts, args.policy_vocab, os.path.join(folder, "policy"), n_positions)
    tiny.train_wordpiece(texts, args.reward_vocab, os.path.join(folder, "reward"),
                         tiny.DISTILBERT_ARCH["max_position_embeddings"])
    return dict(train_reviews=len(texts))


def stage_config(args, overrides):
    """A Config for train.py's --stage sft / reward."""
    return Config(data=os.path.join(args.out_dir, "data"), out_dir=args.out_dir, device=args.device, seed=0,
                  log_every=25, **overrides)


def sft_stage(args, tokenizer_folder):
    torch.manual_seed(0)
    arch = {**tiny.GPT2_ARCH, "n_layer": args.policy_layers, "n_embd": args.policy_width}
    model = tiny.tiny_gpt2(load_tokenizer(tokenizer_folder), **arch)
    cfg = stage_config(args, {**tiny.SFT, "epochs": args.sft_epochs})
    ppl = train_sft(cfg, resolve_device(args.device), model=model, tokenizer_folder=tokenizer_folder, lora=False,
                    test_limit=args.ppl_reviews or None)
    return dict(test_perplexity=ppl, test_reviews=args.ppl_reviews or 25000, weights=n_weights(model), **arch)


def reward_stage(args, tokenizer_folder):
    torch.manual_seed(0)
    arch = {**tiny.DISTILBERT_ARCH, "n_layers": args.reward_layers, "dim": args.reward_width,
            "hidden_dim": 4 * args.reward_width}
    model = tiny.tiny_distilbert(load_tokenizer(tokenizer_folder), **arch)
    cfg = stage_config(args, {**tiny.REWARD, "epochs": args.reward_epochs})
    accuracy = train_reward_model(cfg, resolve_device(args.device), model=model, tokenizer_folder=tokenizer_folder,
                                  test_limit=args.accuracy_reviews or None)
    return dict(test_accuracy=accuracy, test_reviews=args.accuracy_reviews or 25000, weights=n_weights(model), **arch)


def n_weights(model):
    return sum(p.numel() for p in model.parameters())


# ---- stage 5: WARP, through train.py -----------------------------------------------------------

# name: Config overrides on top of tiny.WARP
JOBS = {"reinforce": {}, "rloo": {"rloo_k": 4, "iterations": 2}, "fixed_anchor": {"anchor": "init", "iterations": 1}}


def job_settings(args, job):
    return {**tiny.WARP, "steps": args.steps, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
            **JOBS[job]}


def warp_job(args, seed, job, fresh=False):
    out = os.path.join(args.out_dir, f"seed_{seed}", job)
    argv = [f"--policy={os.path.join(args.out_dir, 'sft')}",
            f"--reward_model={os.path.join(args.out_dir, 'reward_model')}",
            f"--data={os.path.join(args.out_dir, 'data')}", f"--out_dir={out}", f"--seed={100 * seed}",
            f"--device={args.device}", f"--workers={args.workers}", f"--threads={args.threads}",
            f"--log_every={max(1, args.steps // 4)}"]
    argv += [f"--{k}={v}" for k, v in job_settings(args, job).items()] + (["--fresh"] if fresh else [])
    print("$ python train.py " + " ".join(argv), flush=True)
    if train.main(argv) != 0:
        sys.exit(f"reproduce.py: the WARP job in {out} failed (see above); run the command again to resume it")
    return dict(metrics=read_metrics(out))


def read_metrics(job_dir):
    """Per-step training metrics of a job: {iteration: {run: {reward: [...], kl: [...]}}} (JSON keys)."""
    out = {}
    with open(os.path.join(job_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            run = out.setdefault(str(row["iteration"]), {}).setdefault(str(row["run"]), {"reward": [], "kl": []})
            run["reward"].append(round(row["reward"], 4))
            run["kl"].append(round(row["kl"], 4))
    return out


# ---- stage 6: evaluation -----------------------------------------------------------------------

def evaluate_seed(args, seed):
    """KL to the SFT model and reward of every checkpoint of the seed's jobs, the LITI sweeps and
    the LERP merge; returns {"rows": [...], "geometry": {...}}."""
    device = resolve_device(args.device)
    sft_dir = os.path.join(args.out_dir, "sft")
    ref = GPT2.from_pretrained(sft_dir).to(device).eval()
    tokenizer, eos = load_tokenizer(sft_dir), ref.config.eos_token_id
    reward_model = RewardModel(os.path.join(args.out_dir, "reward_model"), device, batch_size=64)
    prompts = load_prompts(os.path.join(args.out_dir, "data"), "eval")
    # as eval.py's defaults: `eval.py --seed S` gives the same completions, hence the same numbers
    settings = dict(max_new_tokens=args.max_new_tokens, temperature=1.0, batch_size=64, seed=seed)
    policy = GPT2(ref.config).to(device).eval()  # one model whose weights change
    theta_sft = load_theta(sft_dir)
    etas = list(args.etas)
    rows, geometry, start = [], {}, time.perf_counter()

    def record(name, result, **extra):
        rows.append(dict(model=name, **{k: v for k, v in result.items() if k != "eta"}, **extra))
        print(f"  {name:<34} KL {result['kl']:7.3f}  reward {result['reward']:+.3f}  finished "
              f"{result['finished']:.2f}  length {result['length']:5.1f}  ({time.perf_counter() - start:.0f}s)",
              flush=True)

    def point(name, theta):
        policy.load_hf_state_dict(theta, where=name)
        record(name, evaluate(policy, ref, reward_model, prompts, tokenizer, eos, **settings))

    def sweep(name, theta_end):  # (1 − η) θ_sft + η θ_end
        liti_sweep(theta_sft, theta_end, etas, policy, ref, reward_model, prompts, tokenizer, eos,
                   log=lambda eta, r: record(f"{name} eta={eta:g}", r, sweep=name, eta=eta), **settings)

    point("sft", theta_sft)
    jobs = [job for job in JOBS if job != "fixed_anchor" or args.ablations]
    for job in jobs:
        theta_init = theta_sft
        for i in range(1, job_settings(args, job)["iterations"] + 1):
            folder = os.path.join(args.out_dir, f"seed_{seed}", job, f"iter_{i}")
            thetas = {name: load_theta(os.path.join(folder, name)) for name in ("run_0", "run_1", "slerp", "liti")}
            for name, theta in thetas.items():
                point(f"{job}/iter_{i}/{name}", theta)
            runs = [thetas["run_0"], thetas["run_1"]]
            geometry[f"{job}/iter_{i}"] = task_vector_geometry(theta_init, runs, thetas["slerp"])
            if job in ("reinforce", "fixed_anchor"):
                sweep(f"{job}/iter_{i}/slerp", thetas["slerp"])
            if job == "reinforce" and i == 1:  # SLERP vs LERP, on the same two runs
                theta_lerp = merging.lerp(theta_init, runs)
                geometry["reinforce/iter_1/lerp"] = task_vector_geometry(theta_init, runs, theta_lerp)
                point("reinforce/iter_1/lerp", theta_lerp)
                sweep("reinforce/iter_1/lerp", theta_lerp)
            theta_init = thetas["liti"]
    return dict(rows=rows, geometry=geometry)


def task_vector_geometry(init, thetas, merged):
    """The two runs' task vectors δ_m = θ_m − θ_init and the merge's: cos between δ_1 and δ_2 over
    the whole model and per tensor (median, over the tensors the runs changed), their norms, and
    ‖δ_merge‖ / mean_m ‖δ_m‖ (SLERP keeps the norm when the δ_m have equal norms; LERP shrinks it)."""
    dot, sq1, sq2, sq_merged, per_tensor = 0.0, 0.0, 0.0, 0.0, []
    for k in init:
        base = init[k].double().flatten()
        d1, d2 = thetas[0][k].double().flatten() - base, thetas[1][k].double().flatten() - base
        n1, n2 = d1.norm().item(), d2.norm().item()
        dot, sq1, sq2 = dot + (d1 @ d2).item(), sq1 + n1 ** 2, sq2 + n2 ** 2
        sq_merged += (merged[k].double().flatten() - base).square().sum().item()
        if n1 > 0 and n2 > 0:
            per_tensor.append((d1 @ d2).item() / (n1 * n2))
    n1, n2 = math.sqrt(sq1), math.sqrt(sq2)
    return dict(cos=dot / (n1 * n2), cos_per_tensor_median=float(np.median(per_tensor)), tensors=len(per_tensor),
                norm_1=n1, norm_2=n2, merge_norm_ratio=math.sqrt(sq_merged) / ((n1 + n2) / 2))


# ---- stage 7: the report -----------------------------------------------------------------------

TABLE = [("SFT", "sft"), ("WARP I=1", "reinforce/iter_1/liti"), ("WARP I=2", "reinforce/iter_2/liti"),
         ("WARP I=3", "reinforce/iter_3/liti"), ("WARP + RLOO (k=4) I=1", "rloo/iter_1/liti"),
         ("WARP + RLOO (k=4) I=2", "rloo/iter_2/liti")]


def mean_spread(values):
    """(mean, sample standard deviation) over seeds; the deviation is None for one seed."""
    values = np.asarray(values, dtype=float)
    return float(values.mean()), (float(values.std(ddof=1)) if len(values) > 1 else None)


def fmt(mean, spread, digits=3, sign=False):
    if round(mean, digits) == 0:
        mean = 0.0  # "0.000", not "-0.000"
    text = f"{mean:+.{digits}f}" if sign else f"{mean:.{digits}f}"
    return text + (f" ± {spread:.{digits}f}" if spread is not None else "")


def front(rows, sweep, by="kl"):
    """(KL, reward) of a LITI sweep's points, in order of KL (or of eta, by="eta")."""
    return [(r["kl"], r["reward"]) for r in sorted((r for r in rows if r.get("sweep") == sweep), key=lambda r: r[by])]


def front_gain(lower, upper):
    """How far front `upper` lies above front `lower`: the mean over upper's points, within lower's
    KL range, of upper's reward minus lower's reward interpolated at the same KL (None if no overlap)."""
    kl_low, r_low = np.array([p[0] for p in lower]), np.array([p[1] for p in lower])
    gains = [r - np.interp(kl, kl_low, r_low) for kl, r in upper if kl_low.min() <= kl <= kl_low.max()]
    return float(np.mean(gains)) if gains else None


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

    rows = [e["rows"] for e in evals]
    geo = [e["geometry"] for e in evals]

    # 1. the merge against the runs it merges, iteration 1
    d_reward = [value(r, "reinforce/iter_1/slerp", "reward") - np.mean([value(r, f"reinforce/iter_1/run_{m}", "reward")
                                                                       for m in (0, 1)]) for r in rows]
    d_kl = [value(r, "reinforce/iter_1/slerp", "kl") - np.mean([value(r, f"reinforce/iter_1/run_{m}", "kl")
                                                               for m in (0, 1)]) for r in rows]
    add("SLERP vs its runs", "the SLERP of the M runs gets a higher reward than the runs themselves (at a higher KL)",
        [f"reward SLERP − mean of the 2 runs {fmt(*mean_spread(d_reward), sign=True)}",
         f"KL SLERP − mean of the 2 runs {fmt(*mean_spread(d_kl), sign=True)}"], d_reward)

    # 2. SLERP vs LERP on the same two runs of iteration 1
    d_reward = [value(r, "reinforce/iter_1/slerp", "reward") - value(r, "reinforce/iter_1/lerp", "reward") for r in rows]
    d_kl = [value(r, "reinforce/iter_1/slerp", "kl") - value(r, "reinforce/iter_1/lerp", "kl") for r in rows]
    ratio_slerp = [g["reinforce/iter_1"]["merge_norm_ratio"] for g in geo]
    ratio_lerp = [g["reinforce/iter_1/lerp"]["merge_norm_ratio"] for g in geo]
    gain = [front_gain(front(r, "reinforce/iter_1/lerp"), front(r, "reinforce/iter_1/slerp")) for r in rows]
    add("SLERP vs LERP", "SLERP of the runs' task vectors gets a higher reward than LERP (at a higher KL), "
        "because it keeps their norm while LERP shrinks it",
        [f"reward SLERP − LERP {fmt(*mean_spread(d_reward), sign=True)}",
         f"KL SLERP − LERP {fmt(*mean_spread(d_kl), sign=True)}",
         f"‖δ_merge‖ / mean ‖δ_m‖: SLERP {fmt(*mean_spread(ratio_slerp))}, LERP {fmt(*mean_spread(ratio_lerp))}",
         f"front SLERP above front LERP at equal KL by {fmt_or_none(gain)}"], d_reward)

    # 3. the EMA anchor vs a fixed (SFT) anchor, iteration 1, same run seeds
    if all("fixed_anchor/iter_1" in g for g in geo):
        def runs_mean(r, job, key):
            return np.mean([value(r, f"{job}/iter_1/run_{m}", key) for m in (0, 1)])
        d_reward = [runs_mean(r, "reinforce", "reward") - runs_mean(r, "fixed_anchor", "reward") for r in rows]
        d_kl = [runs_mean(r, "reinforce", "kl") - runs_mean(r, "fixed_anchor", "kl") for r in rows]
        gain = [front_gain(front(r, "fixed_anchor/iter_1/slerp"), front(r, "reinforce/iter_1/slerp")) for r in rows]
        add("EMA anchor vs fixed anchor", "an EMA anchor lets the policy reach a higher reward than the fixed SFT "
            "anchor (at a higher KL), and its LITI front is better",
            [f"reward of the runs, EMA − fixed {fmt(*mean_spread(d_reward), sign=True)}",
             f"KL of the runs, EMA − fixed {fmt(*mean_spread(d_kl), sign=True)}",
             f"front (SFT → SLERP) EMA above fixed at equal KL by {fmt_or_none(gain)}"], d_reward)

    # 4. the angle between task vectors of two runs
    cos = [g["reinforce/iter_1"]["cos"] for g in geo]
    cos_med = [g["reinforce/iter_1"]["cos_per_tensor_median"] for g in geo]
    later = [g[k]["cos"] for g in geo for k in g if k != "reinforce/iter_1" and not k.endswith("lerp")]
    out.append(dict(name="cosine between task vectors",
                    claim="the task vectors of two RL runs from the same θ_init are far from parallel, so their "
                          "merge is not a copy of either (SLERP's premise)",
                    numbers=[f"cos(δ_1, δ_2), iteration 1, whole model {fmt(*mean_spread(cos))}, per-tensor median "
                             f"{fmt(*mean_spread(cos_med))}",
                             f"other iterations and jobs: {min(later):.3f} to {max(later):.3f}" if later else ""],
                    verdict="measured"))

    # 5. later iterations push the front up; the KL of the WARP model grows with I
    iterations = job_iterations(rows[0], "reinforce")
    numbers = []
    gains = [[front_gain(front(r, f"reinforce/iter_{i}/slerp"), front(r, f"reinforce/iter_{i + 1}/slerp"))
              for i in range(1, iterations)] for r in rows]  # [seed][i]
    for i in range(1, iterations):
        numbers.append(f"front {i + 1} above front {i} at equal KL by {fmt_or_none([g[i - 1] for g in gains])}")
    best = [mean_spread([max(p[1] for p in front(r, f"reinforce/iter_{i}/slerp")) for r in rows])
            for i in range(1, iterations + 1)]
    numbers.append("highest reward of each front: " + ", ".join(f"I={i + 1} {fmt(*b, sign=True)}" for i, b in enumerate(best)))
    per_seed = [np.mean([x for x in g if x is not None]) if any(x is not None for x in g) else None for g in gains]
    add("iterations push the front up", "each WARP iteration's LITI front (SFT → SLERP_i) lies above the previous "
        "one (the mean over iterations of the gain at equal KL, per seed)", numbers, per_seed)
    kls = np.array([[value(r, f"reinforce/iter_{i}/liti", "kl") for i in range(1, iterations + 1)] for r in rows])
    monotone = int((np.diff(kls, axis=1) > 0).all(axis=1).sum())
    add("KL grows with I", "the KL of the WARP model to the SFT model grows with the iterations (reference report; "
        f"verdict on KL(I={iterations}) − KL(I=1) per seed)",
        ["KL: " + ", ".join(f"I={i + 1} {fmt(*mean_spread(kls[:, i]))}" for i in range(iterations)),
         f"increasing at every iteration in {monotone} of {len(rows)} seed(s)"], list(kls[:, -1] - kls[:, 0]))
    return out


def fmt_or_none(values):
    values = [v for v in values if v is not None]
    return fmt(*mean_spread(values), sign=True) if values else "n/a (the fronts' KL ranges do not overlap)"


def job_iterations(rows, job):
    return max(int(r["model"].split("/")[1].split("_")[1]) for r in rows if r["model"].startswith(job + "/"))


def report(args, stages, evals):
    """results.json, results.md and pareto.png in OUT; returns the markdown, and whether it plotted."""
    table = []
    for label, model in TABLE:
        per_seed = [next((r for r in e["rows"] if r["model"] == model), None) for e in evals]
        if any(r is None for r in per_seed):
            continue
        kl, reward = mean_spread([r["kl"] for r in per_seed]), mean_spread([r["reward"] for r in per_seed])
        if len(evals) == 1:  # one seed: the spread shown is the standard error over the eval prompts
            kl, reward = (kl[0], per_seed[0]["kl_se"]), (reward[0], per_seed[0]["reward_se"])
        finished = float(np.mean([r["finished"] for r in per_seed]))
        # reward = finished · P(positive | finished) − (1 − finished): the sentiment part alone
        positive = [(r["reward"] + 1 - r["finished"]) / r["finished"] for r in per_seed if r["finished"] > 0]
        length = float(np.mean([r["length"] for r in per_seed]))
        table.append(dict(setup=label, model=model, kl=kl[0], kl_spread=kl[1], reward=reward[0],
                          reward_spread=reward[1], finished=finished, positive=float(np.mean(positive)) if positive
                          else None, length=length))
    found = claims(evals)
    times = {name: record["seconds"] for name, record in stages.done.items()}
    sft, rm = stages.done["sft"]["result"], stages.done["reward"]["result"]
    results = dict(seeds=args.seeds, settings=dict(warp=job_settings(args, "reinforce"), jobs=JOBS,
                                                    sft=stages.done["sft"]["result"], reward=rm,
                                                    n_eval=args.n_eval, source=os.path.basename(args.source)),
                   table=table, claims=found, stage_seconds=times,
                   total_seconds=stages.wall_time(list(times)),
                   evaluations={str(s): e for s, e in zip(args.seeds, evals)})
    write_json(os.path.join(args.out_dir, "results.json"), rounded(results))

    spread = "± std over seeds" if len(evals) > 1 else "± standard error over the eval prompts"
    lines = [f"KL to the SFT model and mean reward on {args.n_eval} eval prompts, {len(evals)} seed(s) "
             f"({', '.join(map(str, args.seeds))}); {spread}.", "",
             "Also: the fraction of completions that ended (emitted EOS) within the token budget, the mean "
             "P(positive) of those (reward = finished · P(positive) − (1 − finished)), and the mean length.", "",
             "| setup | KL | reward | finished | P(positive) of finished | length |", "|---|---|---|---|---|---|"]
    for t in table:
        positive = "n/a" if t["positive"] is None else f"{t['positive']:.2f}"
        lines.append(f"| {t['setup']} | {fmt(t['kl'], t['kl_spread'])} | {fmt(t['reward'], t['reward_spread'], sign=True)}"
                     f" | {t['finished']:.2f} | {positive} | {t['length']:.1f} |")
    lines += ["", f"Reward model: test accuracy {rm['test_accuracy']:.4f} on {rm['test_reviews']} IMDB test reviews; "
                  f"SFT policy: test perplexity {sft['test_perplexity']:.1f} on {sft['test_reviews']} test reviews.",
              "", "| claim | numbers | verdict |", "|---|---|---|"]
    lines += [f"| {c['name']} | {'; '.join(n for n in c['numbers'] if n)} | {c['verdict']} |" for c in found]
    lines += ["", "| stage | seconds |", "|---|---|"] + [f"| {k} | {v:.0f} |" for k, v in times.items()]
    shared = [n for n in times if not n.startswith("seed_")]
    first = shared + [n for n in times if n.startswith(f"seed_{args.seeds[0]}/")]
    groups = {r["side_by_side"]["group"]: r["side_by_side"]["wall"] for r in stages.done.values() if "side_by_side" in r}
    lines += [f"| {group}, side by side (wall time) | {wall:.0f} |" for group, wall in groups.items()]
    lines += [f"| total, one seed (shared stages + seed {args.seeds[0]}) | {stages.wall_time(first):.0f} |",
              f"| total | {stages.wall_time(list(times)):.0f} |"]
    markdown = "\n".join(lines) + "\n"
    hub.write_text(os.path.join(args.out_dir, "results.md"), markdown)
    plotted = plot(evals[0], stages.done, args.seeds[0], os.path.join(args.out_dir, "pareto.png"))
    return markdown, plotted


def plot(evaluation, done, seed, path):
    """KL-reward plane (left): the WARP models I = 1..3 and their path from the SFT model, each
    iteration's LITI sweep SFT → SLERP_i, the runs, RLOO, LERP and the fixed anchor; right: the
    training reward and KL to the anchor per RL step. Returns False without matplotlib."""
    try:
        from matplotlib.figure import Figure  # optional: pip install matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    rows = {r["model"]: r for r in evaluation["rows"]}
    fig = Figure(figsize=(12, 5.5), layout="constrained")
    axes = fig.subplot_mosaic([["pareto", "reward"], ["pareto", "kl"]], width_ratios=[1.3, 1])
    ax, ax_r, ax_k = axes["pareto"], axes["reward"], axes["kl"]
    n_iter = job_iterations(evaluation["rows"], "reinforce")
    for i in range(1, n_iter + 1):
        pts = front(evaluation["rows"], f"reinforce/iter_{i}/slerp", by="eta")
        line, = ax.plot(*zip(*pts), ".-", label=f"LITI sweep SFT → SLERP, iteration {i}")
        for m in (0, 1):
            r = rows[f"reinforce/iter_{i}/run_{m}"]
            ax.plot(r["kl"], r["reward"], "x", color=line.get_color(), label=f"RL runs, iteration {i}" if m == 0 else None)
    for name, style, label in (("reinforce/iter_1/lerp", ":", "LITI sweep SFT → LERP, iteration 1"),
                               ("fixed_anchor/iter_1/slerp", "--", "LITI sweep SFT → SLERP, fixed anchor")):
        pts = front(evaluation["rows"], name, by="eta")
        if pts:
            ax.plot(*zip(*pts), style, color="gray" if "fixed" in name else "olive", label=label)
    path_models = ["sft"] + [f"reinforce/iter_{i}/liti" for i in range(1, n_iter + 1)]
    ax.plot([rows[m]["kl"] for m in path_models], [rows[m]["reward"] for m in path_models], "ko-", lw=1,
            label="WARP (REINFORCE): SFT, I = 1, 2, 3")
    rloo = ["sft"] + [m for m in (f"rloo/iter_{i}/liti" for i in (1, 2, 3)) if m in rows]
    ax.plot([rows[m]["kl"] for m in rloo], [rows[m]["reward"] for m in rloo], "s--", color="purple", lw=1,
            label="WARP + RLOO (k=4): SFT, I = 1, 2")
    for k, m in enumerate(path_models[1:], 1):
        ax.annotate(f"I={k}", (rows[m]["kl"], rows[m]["reward"]), textcoords="offset points", xytext=(5, -12), fontsize=8)
    ax.set(xlabel="KL(π ‖ π_SFT)", ylabel="reward (P(positive); −1 without EOS)",
           title=f"KL–reward, {rows['sft']['n']} eval prompts, seed {seed}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    for job, color in (("reinforce", "black"), ("rloo", "purple")):
        key = f"seed_{seed}/{job}"
        if key not in done:
            continue
        offset = 0
        for i, runs in sorted(done[key]["result"]["metrics"].items(), key=lambda kv: int(kv[0])):
            for m, run in sorted(runs.items()):
                steps = np.arange(offset + 1, offset + len(run["reward"]) + 1)
                kw = dict(color=color, alpha=0.8 if m == "0" else 0.4, lw=1)
                ax_r.plot(steps, run["reward"], **kw, label=f"{job}" if (i, m) == ("1", "0") else None)
                ax_k.plot(steps, run["kl"], **kw)
            offset += len(run["reward"])
            ax_r.axvline(offset + 0.5, color="gray", lw=0.5)
            ax_k.axvline(offset + 0.5, color="gray", lw=0.5)
    ax_r.set(ylabel="training reward", title="RL training: both runs of each iteration")
    ax_k.set(xlabel="RL step (iterations one after the other)", ylabel="KL to the anchor")
    ax_r.legend(fontsize=7)
    for a in (ax_r, ax_k):
        a.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    return True


# ---- the pipeline ------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out_dir, exist_ok=True)
    check_settings(args)
    stages = Stages(args.out_dir)
    out = lambda *parts: os.path.join(args.out_dir, *parts)  # noqa: E731
    total = time.perf_counter()
    try:
        stages("tokenizers", out("tokenizers"), lambda: train_tokenizers(args, out("tokenizers")))
        stages("prepare", out("data", "meta.json"),
               lambda: prepare(args.source, out("tokenizers", "policy"), out("data"), n_eval=args.n_eval,
                               cache_dir=out("cache"))["counts"], after=["tokenizers"])
        stages.side_by_side([("sft", out("sft", "config.json"), sft_stage, args, out("tokenizers", "policy")),
                             ("reward", out("reward_model", "config.json"), reward_stage, args, out("tokenizers", "reward"))],
                            args.workers, args.threads, after=["tokenizers", "prepare"])
        models = ["prepare", "sft", "reward"]  # what every WARP job and evaluation is computed from
        evals = []
        for seed in args.seeds:
            jobs = [f"seed_{seed}/{job}" for job in JOBS if job != "fixed_anchor" or args.ablations]
            for name in jobs:
                job = name.split("/")[1]
                iterations = job_settings(args, job)["iterations"]
                # a job whose models were redone starts over (--fresh) instead of resuming
                fresh = bool(stages.stale(name, models))
                stages(name, out(f"seed_{seed}", job, f"iter_{iterations}", "liti", "config.json"),
                       lambda: warp_job(args, seed, job, fresh), after=models)
            evals.append(stages(f"seed_{seed}/evaluate", out(f"seed_{seed}"), lambda: evaluate_seed(args, seed),
                                after=models + jobs))
    except (DataError, hub.CheckpointError, ValueError) as e:
        sys.exit(f"reproduce.py: error: {e}")
    start = time.perf_counter()
    markdown, plotted = report(args, stages, evals)
    print(f"\n=== report: {time.perf_counter() - start:.1f}s\n\n{markdown}")
    print(f"this invocation: {time.perf_counter() - total:.0f}s ({len(stages.ran)} stages run, the others done earlier)")
    print(f"wrote {out('results.json')}, {out('results.md')}" + (f", {out('pareto.png')}" if plotted else ""))


if __name__ == "__main__":
    main()
