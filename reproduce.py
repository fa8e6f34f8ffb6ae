"""
WARP on real IMDB reviews, on a laptop CPU, offline, in one command: tiny policy, reward model and
independent judge trained from scratch, a diagnosis of what RL can learn, WARP with REINFORCE and
RLOO, the evaluation, the tables, the plots, and the paper's claims checked, every stage timed.

    python reproduce.py --source ../shared/data/imdb/aclImdb_labeled.tar.gz                 # one seed
    python reproduce.py --source ../shared/data/imdb/aclImdb_labeled.tar.gz --seeds 0 1 2    # three

Only the models are small (nanowarp/tiny.py); every stage is the package's ordinary code path and
every model an ordinary checkpoint that train.py, merge.py and eval.py take:

  1. tokenizers  a byte-level BPE (policy) and a lowercase WordPiece (classifier), trained on the
                 training reviews with the `tokenizers` library, saved in the Hugging Face layout
  2. prepare     nanowarp.data.prepare: training prompts, the eval prompts, the labelled reviews
  3. sft         a tiny GPT-2 trained from scratch on the training reviews (EOS after each)
  4. reward      a tiny DistilBERT trained from scratch on half a of the labelled reviews, whole and
                 in word windows as short as the texts it will score
  5. judge       the SFT model's GPT-2 body with a classifier head, trained on half b: it only evaluates
  6. diagnose,   how the classifiers read texts of the completions' length, the sentiment words of
     signal      the SFT model's completions, and each reward's policy-gradient signal
  for each seed s (WARP's --seed is 100·s: the job's run seeds never overlap another seed's):
  7. warp        train.py: REINFORCE (I = 3), RLOO k = 4 (I = 2), and the fixed-anchor ablation (I = 1)
  8. evaluate    KL (sampled and exact), reward, judge, held-out NLL and distinct-n on the eval prompts,
                 for every checkpoint, the LITI sweep SFT → SLERP of each iteration, and the LERP of
                 iteration 1's runs (in --workers processes)
  9. report      OUT/results.json, OUT/results.md and OUT/pareto.png (matplotlib, when installed)

A finished stage is recorded in OUT/stages.json and skipped when the command runs again, so an
interrupted reproduction resumes (a WARP job also resumes inside itself), and `--seeds 0 1 2` after
`--seeds 0` only adds seeds 1 and 2. Delete a stage's output folder to redo it: the stages computed
from it are then redone too (a seed's evaluation after its WARP jobs; every WARP job, from scratch,
after the SFT or reward model; the evaluations after the judge). Other sizes or budgets need another --out_dir (OUT/settings.json
holds the flags, and a change is refused).
"""

import collections
import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import os
import re
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)  # run from anywhere without installing

import train  # noqa: E402  (train.main(argv) is `python train.py ARGV`)
from nanowarp import hub, merging, tiny  # noqa: E402
from nanowarp.config import Config, changed_flags, fail, flag, parse_args as parse_flags, resolve_device  # noqa: E402
from nanowarp.hub import write_json  # noqa: E402
from nanowarp.data import IMDB_URL, DataError, clean, load_prompts, load_reviews, prepare, read_imdb  # noqa: E402
from nanowarp.evaluate import evaluate, heldout_sequences  # noqa: E402
from nanowarp.gpt2 import GPT2, load_theta  # noqa: E402
from nanowarp.reward import RewardModel  # noqa: E402
from nanowarp.lora import add_lora  # noqa: E402
from nanowarp.logprobs import completion_logprobs  # noqa: E402
from nanowarp.rl import decode, rloo_advantages  # noqa: E402
from nanowarp.sampling import sample  # noqa: E402
from nanowarp.supervised import test_subset, train_reward_model, train_sft, word_windows  # noqa: E402
from nanowarp.tokenizer import load_tokenizer  # noqa: E402


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
    judge_epochs: float = flag(tiny.JUDGE["epochs"], "passes over its half of the training reviews of the judge")
    steps: int = flag(tiny.WARP["steps"], "T: RL steps per WARP run")
    batch_size: int = flag(tiny.WARP["batch_size"], "completions per RL step")
    max_new_tokens: int = flag(tiny.WARP["max_new_tokens"], "completion length, in RL and evaluation")
    n_eval: int = flag(1000, "eval prompts: the first N test reviews of at least 200 characters in eval order (the "
                             "reference's 100, all negative, then positive and negative alike)")
    n_reference: int = flag(100, "the table of SPEC §2 (KL, reward) also on the first N eval prompts, the reference's")
    heldout: int = flag(500, "held-out NLL (forgetting) on this many test reviews, evenly spaced")
    samples: int = flag(3, "sample completions kept per model of the table")
    etas: tuple = flag(tuple(round(i / 5, 10) for i in range(6)), "eta values of each LITI sweep, in [0, 1] "
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
            fail("reproduce.py", f"{args.out_dir} holds a reproduction with other settings: {', '.join(differing)}. "
                                 f"Use its settings to resume it, or another --out_dir")
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


def judge_stage(args, tokenizer_folder):
    """The independent judge: the SFT model's GPT-2 body with a new classifier head read at the last
    token, fine-tuned on the half of the labelled reviews the reward model never saw; it only ever
    evaluates."""
    torch.manual_seed(0)
    model = tiny.gpt2_classifier_from(GPT2.from_pretrained(os.path.join(args.out_dir, "sft")))
    cfg = stage_config(args, {**tiny.JUDGE, "epochs": args.judge_epochs})
    accuracy = train_reward_model(cfg, resolve_device(args.device), model=model, tokenizer_folder=tokenizer_folder,
                                  test_limit=args.accuracy_reviews or None, name="judge")
    return dict(test_accuracy=accuracy, test_reviews=args.accuracy_reviews or 25000, weights=n_weights(model))


WORD = re.compile(r"[a-z']+")


def sentiment_words(texts, labels, n=50, min_reviews=200):
    """The n words whose presence most separates positive from negative reviews (log-odds of the
    fraction of reviews of each label holding them; words in at least min_reviews reviews)."""
    df = [collections.Counter(), collections.Counter()]
    for text, label in zip(texts, labels):
        df[label].update(set(WORD.findall(text.lower())))
    count = [labels.count(0), labels.count(1)]
    words = [w for w in set(df[0]) | set(df[1]) if df[0][w] + df[1][w] >= min_reviews]
    odds = {w: math.log((df[1][w] + 1) / (count[1] + 2)) - math.log((df[0][w] + 1) / (count[0] + 2)) for w in words}
    ranked = sorted(words, key=lambda w: (-odds[w], w))
    return ranked[:n], ranked[::-1][:n]


@torch.no_grad()
def diagnose_stage(args, n_reviews=2000, n_prompts=512):
    """What the RL will see, measured before it runs: how the reward model and the judge read texts
    of the completions' length, and whether the SFT model's completions carry sentiment at all."""
    torch.manual_seed(0)
    data = os.path.join(args.out_dir, "data")
    texts, labels = test_subset(*load_reviews(data, "test"), n_reviews)
    windows, _ = word_windows(texts, labels, 1, 32, 32, seed=0)
    found, classifiers = {}, {"reward model": RewardModel(os.path.join(args.out_dir, "reward_model")),
                              "judge": RewardModel(os.path.join(args.out_dir, "judge"))}
    truth = torch.tensor(labels)
    for name, model in classifiers.items():
        whole, short = model.score(texts), model.score(windows)
        found[f"{name}: accuracy on whole test reviews / on 32-word windows of them"] = \
            f"{((whole > 0.5).long() == truth).float().mean():.3f} / {((short > 0.5).long() == truth).float().mean():.3f}"
    sft = GPT2.from_pretrained(os.path.join(args.out_dir, "sft")).eval()
    tokenizer, eos = load_tokenizer(os.path.join(args.out_dir, "sft")), sft.config.eos_token_id
    prompts = load_prompts(data, "eval")[:n_prompts]
    completions, full = [], []
    for start in range(0, len(prompts), 64):
        batch = prompts[start:start + 64]
        s = sample(sft, batch, args.max_new_tokens, eos_token_id=eos, generator=torch.Generator().manual_seed(start))
        n = s.mask.sum(1)
        full += decode(tokenizer, batch, s.tokens, n)
        completions += tokenizer.decode_batch([t[:k] for t, k in zip(s.tokens.tolist(), n.tolist())],
                                              skip_special_tokens=True)
    reward, judged = classifiers["reward model"].score(full), classifiers["judge"].score(full)
    found["reward model's P(positive) of the SFT model's prompt + completion: mean, std, share < 0.1, share > 0.9"] = \
        f"{reward.mean():.3f}, {reward.std():.3f}, {(reward < 0.1).float().mean():.2f}, {(reward > 0.9).float().mean():.2f}"
    found["judge's P(positive) of the same: mean, std; correlation with the reward model"] = \
        f"{judged.mean():.3f}, {judged.std():.3f}; {np.corrcoef(reward.numpy(), judged.numpy())[0, 1]:.2f}"
    positive, negative = sentiment_words(*load_reviews(data, "train"))
    real = [" ".join(t.split()[10:10 + len(c.split())]) for t, c in zip(texts, completions)]  # as many words
    share = lambda ts, ws: np.mean([any(w in set(WORD.findall(t.lower())) for w in ws) for t in ts])  # noqa: E731
    found["SFT completions holding one of the 50 most positive / most negative words"] = \
        f"{share(completions, positive):.2f} / {share(completions, negative):.2f} " \
        f"(real review text of the same length: {share(real, positive):.2f} / {share(real, negative):.2f})"
    found["the 10 most positive and negative words"] = f"{' '.join(positive[:10])} / {' '.join(negative[:10])}"
    return found


def signal_stage(args, n_batches=6, n_prompts=32, k=4):
    """The policy-gradient signal of each reward at the SFT model: the cosine between the LoRA gradients
    (the first step's: B = 0, so only B has one) of independent batches of n_prompts x k completions,
    with RLOO advantages. Near 0, a batch's gradient is mostly noise: RL then needs about 1/cos batches
    to move the policy along the reward. Rewards: the reward model's P(positive) alone (sentiment), the
    RL reward (with −1 without EOS), and the judge's P(positive)."""
    torch.manual_seed(0)
    sft_dir, cfg = os.path.join(args.out_dir, "sft"), tiny.WARP
    policy = add_lora(GPT2.from_pretrained(sft_dir), cfg["lora_rank"], cfg["lora_alpha"])
    params = [p for p in policy.parameters() if p.requires_grad]
    tokenizer, eos = load_tokenizer(sft_dir), policy.config.eos_token_id
    reward_model, judge = (RewardModel(os.path.join(args.out_dir, name)) for name in ("reward_model", "judge"))
    prompts = load_prompts(os.path.join(args.out_dir, "data"), "train")
    order, generator = np.random.default_rng(0), torch.Generator().manual_seed(0)
    grads = collections.defaultdict(list)
    for _ in range(n_batches):
        batch = [prompts[i] for i in order.choice(len(prompts), n_prompts, replace=len(prompts) < n_prompts)
                 for _ in range(k)]
        with torch.no_grad():
            s = sample(policy, batch, args.max_new_tokens, eos_token_id=eos, generator=generator)
        texts = decode(tokenizer, batch, s.tokens, s.mask.sum(1))
        positive = reward_model.score(texts)
        for name, reward in (("reward model's P(positive) alone", positive),
                             ("the RL reward (−1 without EOS)", torch.where(s.finished, positive, torch.tensor(-1.0))),
                             ("the judge's P(positive)", judge.score(texts))):
            policy.zero_grad()
            logp = completion_logprobs(policy, s.prompt, s.prompt_mask, s.tokens, 1.0)
            (-(rloo_advantages(reward, k) * (logp * s.mask).sum(1)).mean()).backward()
            grads[name].append(torch.cat([p.grad.flatten() for p in params]))
    found = {}
    for name, g in grads.items():
        cos = [F.cosine_similarity(g[i], g[j], 0).item() for i in range(n_batches) for j in range(i + 1, n_batches)]
        found[name] = f"{np.mean(cos):+.3f} ± {np.std(cos) / math.sqrt(len(cos)):.3f}"
    return found


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

def eval_tasks(args, seed):
    """What the seed's evaluation computes, as (name, recipe, extra) tasks: a recipe says how to build
    the weights (recipe_theta), extra goes into the row (sweep, eta). Every checkpoint of the seed's
    jobs, each iteration's LITI sweep SFT → SLERP, and iteration 1's LERP of the same runs."""
    sft = os.path.join(args.out_dir, "sft")
    tasks = [("sft", ("load", sft), {})]

    def sweep(name, end):
        tasks.extend((f"{name} eta={eta:g}", ("liti", sft, end, eta), dict(sweep=name, eta=eta)) for eta in args.etas)

    for job in (job for job in JOBS if job != "fixed_anchor" or args.ablations):
        theta_init = sft
        for i in range(1, job_settings(args, job)["iterations"] + 1):
            folder = os.path.join(args.out_dir, f"seed_{seed}", job, f"iter_{i}")
            tasks += [(f"{job}/iter_{i}/{name}", ("load", os.path.join(folder, name)), {})
                      for name in ("run_0", "run_1", "slerp", "liti")]
            if job in ("reinforce", "fixed_anchor"):
                sweep(f"{job}/iter_{i}/slerp", ("load", os.path.join(folder, "slerp")))
            if job == "reinforce" and i == 1:  # SLERP vs LERP, on the same two runs
                lerp = ("lerp", theta_init, [os.path.join(folder, f"run_{m}") for m in (0, 1)])
                tasks.append(("reinforce/iter_1/lerp", lerp, {}))
                sweep("reinforce/iter_1/lerp", lerp)
            theta_init = os.path.join(folder, "liti")
    return tasks


def recipe_theta(recipe):
    kind, *parts = recipe
    if kind == "load":
        return load_theta(parts[0])
    if kind == "lerp":
        return merging.lerp(load_theta(parts[0]), [load_theta(p) for p in parts[1]])
    start, end, eta = parts
    return merging.liti(load_theta(start), recipe_theta(end), eta)


_EVAL = {}  # what each evaluation process loads once: models, prompts, settings


def _eval_setup(args, seed, threads):
    torch.set_num_threads(threads or 1)
    device = resolve_device(args.device)
    sft_dir, data = os.path.join(args.out_dir, "sft"), os.path.join(args.out_dir, "data")
    ref = GPT2.from_pretrained(sft_dir).to(device).eval()
    tokenizer, eos = load_tokenizer(sft_dir), ref.config.eos_token_id
    prompts = load_prompts(data, "eval")
    _EVAL.update(
        ref=ref, tokenizer=tokenizer, eos=eos, policy=GPT2(ref.config).to(device).eval(), prompts=prompts,
        # as eval.py's defaults: `eval.py --seed S` gives the same completions, hence the same numbers
        settings=dict(max_new_tokens=args.max_new_tokens, temperature=1.0, batch_size=64, seed=seed,
                      judge=RewardModel(os.path.join(args.out_dir, "judge"), device, batch_size=64),
                      heldout=heldout_sequences(data, args.heldout, tokenizer, ref.config.n_positions, eos)),
        reward_model=RewardModel(os.path.join(args.out_dir, "reward_model"), device, batch_size=64),
        n_reference=args.n_reference, samples=args.samples)


def _eval_task(task):
    """One row: the model of `task` on every eval prompt, and (SPEC §2's table) on the reference's
    first prompts; sample completions for the table's models."""
    name, recipe, extra = task
    e, start = _EVAL, time.perf_counter()
    e["policy"].load_hf_state_dict(recipe_theta(recipe), where=name)
    in_table = name in {model for _, model in TABLE}
    row = dict(model=name, **evaluate(e["policy"], e["ref"], e["reward_model"], e["prompts"], e["tokenizer"],
                                      e["eos"], samples=e["samples"] if in_table else 0, **e["settings"]), **extra)
    if in_table:
        reference = evaluate(e["policy"], e["ref"], e["reward_model"], e["prompts"][:e["n_reference"]],
                             e["tokenizer"], e["eos"], **{**e["settings"], "judge": None, "heldout": None})
        row["reference"] = {k: reference[k] for k in ("kl", "kl_se", "reward", "reward_se", "finished", "n")}
    print(f"  {name:<34} KL {row['kl']:7.3f}  reward {row['reward']:+.3f}  judge {row['judge']:.3f}  held-out NLL "
          f"{row['heldout_nll']:.3f}  length {row['length']:5.1f}  ({time.perf_counter() - start:.0f}s)", flush=True)
    return row


def evaluate_seed(args, seed):
    """Every task of eval_tasks, in `workers` processes; returns {"rows": [...], "geometry": {...}}
    (the task vectors' cosines and norms, per iteration)."""
    tasks = eval_tasks(args, seed)
    if args.workers <= 1:
        _eval_setup(args, seed, args.threads)
        rows = [_eval_task(t) for t in tasks]
    else:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.workers, ctx, initializer=_eval_setup,
                                                    initargs=(args, seed, args.threads)) as pool:
            rows = list(pool.map(_eval_task, tasks))
    geometry = {}
    for job in (job for job in JOBS if job != "fixed_anchor" or args.ablations):
        theta_init = os.path.join(args.out_dir, "sft")
        for i in range(1, job_settings(args, job)["iterations"] + 1):
            folder = os.path.join(args.out_dir, f"seed_{seed}", job, f"iter_{i}")
            runs = [load_theta(os.path.join(folder, f"run_{m}")) for m in (0, 1)]
            init = load_theta(theta_init)
            geometry[f"{job}/iter_{i}"] = task_vector_geometry(init, runs, load_theta(os.path.join(folder, "slerp")))
            if job == "reinforce" and i == 1:
                geometry["reinforce/iter_1/lerp"] = task_vector_geometry(init, runs, merging.lerp(init, runs))
            theta_init = os.path.join(folder, "liti")
    return dict(rows=rows, geometry=geometry)


def task_vector_geometry(init, thetas, merged):
    """merging.task_vector_stats of the two runs and their merge, as results.json records them: cos
    between δ_1 and δ_2 over the whole model and per tensor (median), their norms, and
    ‖δ_merge‖ / mean ‖δ_m‖."""
    stats = merging.task_vector_stats(init, thetas, merged)
    return {k: stats[k] for k in ("cos", "cos_per_tensor_median", "tensors", "norm_1", "norm_2", "merge_norm_ratio")}


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


def front(rows, sweep, by="kl", y="reward", x="kl"):
    """(x, y) = (KL, reward) (or other columns) of a LITI sweep's points, in order of KL (or of eta, by="eta")."""
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

    # 6. the independent judge: does WARP make the reviews more positive, beyond the reward model?
    last = f"reinforce/iter_{iterations}/slerp"
    warp2 = "reinforce/iter_2/liti" if iterations >= 2 else "reinforce/iter_1/liti"
    d_judge = [value(r, warp2, "judge") - value(r, "sft", "judge") for r in rows]
    d_reward = [value(r, warp2, "reward") - value(r, "sft", "reward") for r in rows]
    add("the judge agrees", f"WARP I = {warp2.split('/')[1][5:]} writes more positive reviews according to an "
        "independent judge it never trained on (target: +0.30 over the SFT model)",
        [f"judge WARP − SFT {fmt(*mean_spread(d_judge), sign=True)}",
         f"reward-model reward WARP − SFT {fmt(*mean_spread(d_reward), sign=True)}"], d_judge)
    gain = [front_gain(runs_trajectory(r, y="judge"), front(r, last, y="judge")) for r in rows]
    add("front above the RL runs (judge)", f"the LITI front of the last iteration (SFT → SLERP_{iterations}) lies "
        "above the RL runs' own points (every run of every iteration) at equal KL, in judge reward",
        [f"front above the runs at equal KL by {fmt_or_none(gain)} (judge)",
         f"in reward-model reward: {fmt_or_none([front_gain(runs_trajectory(r), front(r, last)) for r in rows])}"],
        gain)

    # 7. reward hacking: the judge's gain against the reward model's, as KL grows
    def gain_ratios(r, keep):  # judge gain / reward gain over the SFT model of the kept rows, in order of KL
        r0, j0 = value(r, "sft", "reward"), value(r, "sft", "judge")
        return [(x["judge"] - j0) / (x["reward"] - r0) for x in sorted(r, key=lambda x: x["kl"])
                if keep(x) and abs(x["reward"] - r0) > 1e-3]
    numbers = []
    for label, keep in (("RL runs", lambda x: x["model"].startswith("reinforce/") and "/run_" in x["model"]),
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
                 if x["model"].startswith("reinforce/") and "/run_" in x["model"] and rw.min() <= x["reward"] <= rw.max()]
        return float(np.mean(gains)) if gains else None
    forget = [nll_gain(r) for r in rows]
    add("less forgetting", "at equal reward, the LITI front forgets less of the SFT language model than the RL runs "
        "(lower held-out NLL)", [f"held-out NLL, runs − front at equal reward {fmt_or_none(forget)} nats/token",
                                 f"SFT {fmt(*mean_spread([value(r, 'sft', 'heldout_nll') for r in rows]))}, WARP I = "
                                 f"{iterations} {fmt(*mean_spread([value(r, f'reinforce/iter_{iterations}/liti', 'heldout_nll') for r in rows]))}"],
        forget)
    return out


def fmt_or_none(values):
    values = [v for v in values if v is not None]
    return fmt(*mean_spread(values), sign=True) if values else "n/a (the fronts' KL ranges do not overlap)"


def job_iterations(rows, job):
    return max(int(r["model"].split("/")[1].split("_")[1]) for r in rows if r["model"].startswith(job + "/"))


COLUMNS = ["kl", "kl_exact", "reward", "judge", "heldout_nll", "distinct_2", "finished", "length"]


def table_rows(evals, column_key=lambda row: row):
    """The TABLE's models: each column's mean over seeds and its spread (the std over seeds; with one
    seed, the standard error over the eval prompts where there is one)."""
    table = []
    for label, model in TABLE:
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


def report(args, stages, evals):
    """results.json, results.md and pareto.png in OUT; returns the markdown, and whether it plotted."""
    table = table_rows(evals)
    reference = table_rows(evals, lambda row: row["reference"])
    found = claims(evals)
    times = {name: record["seconds"] for name, record in stages.done.items()}
    sft, rm = stages.done["sft"]["result"], stages.done["reward"]["result"]
    results = dict(seeds=args.seeds, settings=dict(warp=job_settings(args, "reinforce"), jobs=JOBS,
                                                    sft=stages.done["sft"]["result"], reward=rm,
                                                    judge=stages.done["judge"]["result"],
                                                    n_eval=args.n_eval, source=os.path.basename(args.source)),
                   table=table, reference_table=reference, claims=found, stage_seconds=times,
                   total_seconds=stages.wall_time(list(times)),
                   evaluations={str(s): e for s, e in zip(args.seeds, evals)})
    write_json(os.path.join(args.out_dir, "results.json"), rounded(results))

    spread = "± std over seeds" if len(evals) > 1 else "± standard error over the eval prompts"
    lines = [f"On {args.n_eval} eval prompts (test reviews, half positive, half negative), {len(evals)} seed(s) "
             f"({', '.join(map(str, args.seeds))}); {spread}. KL: the sampled estimate; KL exact: summed over the "
             "vocabulary along the same completions; reward: the reward model's P(positive), −1 without EOS; "
             "judge: the independent judge's P(positive) of every completion; held-out NLL: nats per token on "
             f"{args.heldout} test reviews; distinct-2: distinct bigrams / bigrams of the completions.", "",
             "| setup | KL | KL exact | reward | judge | held-out NLL | distinct-2 | finished | length |",
             "|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        lines.append(f"| {t['setup']} | {fmt(t['kl'], t['kl_spread'])} | {fmt(t['kl_exact'], t['kl_exact_spread'])} | "
                     f"{fmt(t['reward'], t['reward_spread'], sign=True)} | {fmt(t['judge'], t['judge_spread'])} | "
                     f"{t['heldout_nll']:.3f} | {t['distinct_2']:.3f} | {t['finished']:.2f} | {t['length']:.1f} |")
    lines += ["", f"SPEC §2's table, on the reference's {args.n_reference} eval prompts (all from negative reviews):",
              "", "| setup | KL | reward | finished |", "|---|---|---|---|"]
    lines += [f"| {t['setup']} | {fmt(t['kl'], t['kl_spread'])} | {fmt(t['reward'], t['reward_spread'], sign=True)} | "
              f"{t['finished']:.2f} |" for t in reference]
    judge = stages.done["judge"]["result"]
    lines += ["", f"Reward model: test accuracy {rm['test_accuracy']:.4f} on {rm['test_reviews']} IMDB test reviews; "
                  f"judge: {judge['test_accuracy']:.4f}; SFT policy: test perplexity {sft['test_perplexity']:.1f} on "
                  f"{sft['test_reviews']} test reviews."]
    if "diagnose" in stages.done:
        lines += ["", "Diagnosis (the SFT model's completions and the classifiers on texts of their length):", ""]
        lines += [f"- {k}: {v}" for k, v in stages.done["diagnose"]["result"].items()]
    if "signal" in stages.done:
        lines += ["", "Policy-gradient signal at the SFT model: cosine between the gradients of independent batches "
                      "of 128 completions (RLOO, k = 4), by reward:", ""]
        lines += [f"- {k}: {v}" for k, v in stages.done["signal"]["result"].items()]
    samples = {t["model"]: next(r for r in evals[0]["rows"] if r["model"] == t["model"]).get("samples", [])
               for t in table}
    if samples.get("sft") and samples.get("reinforce/iter_2/liti"):
        lines += ["", f"Sample completions, seed {args.seeds[0]} (prompt in bold):", ""]
        for a, b in zip(samples["sft"], samples["reinforce/iter_2/liti"]):
            lines += [f"- **{a['prompt']}** SFT: {a['completion']!r} · WARP I=2: {b['completion']!r}"]
    lines += ["", "| claim | numbers | verdict |", "|---|---|---|"]
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
    """Three planes against KL to the SFT model (the reward model's reward, the judge's P(positive),
    the held-out NLL): the WARP models I = 1..3 and their path from the SFT model, each iteration's
    LITI sweep SFT → SLERP_i, the runs, RLOO, LERP and the fixed anchor; and the training reward per
    RL step. Returns False without matplotlib."""
    try:
        from matplotlib.figure import Figure  # optional: pip install matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    rows = {r["model"]: r for r in evaluation["rows"]}
    fig = Figure(figsize=(13, 9), layout="constrained")
    axes = fig.subplot_mosaic([["reward", "judge"], ["nll", "train"]])
    n_iter = job_iterations(evaluation["rows"], "reinforce")
    labels = {"reward": "reward model: P(positive), −1 without EOS", "judge": "judge: P(positive) (never trained on)",
              "heldout_nll": "held-out NLL (nats/token; lower = less forgotten)"}
    for key, ax in (("reward", axes["reward"]), ("judge", axes["judge"]), ("heldout_nll", axes["nll"])):
        for i in range(1, n_iter + 1):
            pts = front(evaluation["rows"], f"reinforce/iter_{i}/slerp", by="eta", y=key)
            line, = ax.plot(*zip(*pts), ".-", label=f"LITI sweep SFT → SLERP, iteration {i}")
            for m in (0, 1):
                r = rows[f"reinforce/iter_{i}/run_{m}"]
                ax.plot(r["kl"], r[key], "x", color=line.get_color(), label=f"RL runs, iteration {i}" if m == 0 else None)
        for name, style, label in (("reinforce/iter_1/lerp", ":", "LITI sweep SFT → LERP, iteration 1"),
                                   ("fixed_anchor/iter_1/slerp", "--", "LITI sweep SFT → SLERP, fixed anchor")):
            pts = front(evaluation["rows"], name, by="eta", y=key)
            if pts:
                ax.plot(*zip(*pts), style, color="gray" if "fixed" in name else "olive", label=label)
        path_models = ["sft"] + [f"reinforce/iter_{i}/liti" for i in range(1, n_iter + 1)]
        ax.plot([rows[m]["kl"] for m in path_models], [rows[m][key] for m in path_models], "ko-", lw=1,
                label=f"WARP (REINFORCE): SFT, I = 1..{n_iter}")
        rloo = ["sft"] + [m for m in (f"rloo/iter_{i}/liti" for i in (1, 2, 3)) if m in rows]
        ax.plot([rows[m]["kl"] for m in rloo], [rows[m][key] for m in rloo], "s--", color="purple", lw=1,
                label="WARP + RLOO (k=4): SFT, I = 1, 2")
        for k, m in enumerate(path_models[1:], 1):
            ax.annotate(f"I={k}", (rows[m]["kl"], rows[m][key]), textcoords="offset points", xytext=(5, -12), fontsize=8)
        ax.set(xlabel="KL(π ‖ π_SFT)", ylabel=labels[key])
        ax.grid(alpha=0.3)
    axes["reward"].set_title(f"KL–reward, {rows['sft']['n']} eval prompts, seed {seed}")
    axes["judge"].set_title("the same completions, scored by the independent judge")
    sft_judge = rows["sft"]["judge"]  # the judge on the reward plane's scale: its target, +0.30, in view
    target = axes["judge"].axhline(sft_judge + 0.30, color="red", ls=":", lw=1, label="target: the SFT model's + 0.30")
    axes["judge"].set_ylim(sft_judge - 0.15, sft_judge + 0.45)
    axes["judge"].legend(handles=[target], fontsize=7, loc="upper left")
    axes["nll"].set_title("forgetting: NLL of held-out real reviews")
    axes["reward"].legend(fontsize=7, loc="lower right")
    ax_r = axes["train"]
    for job, color in (("reinforce", "black"), ("rloo", "purple")):
        key = f"seed_{seed}/{job}"
        if key not in done:
            continue
        offset = 0
        for i, runs in sorted(done[key]["result"]["metrics"].items(), key=lambda kv: int(kv[0])):
            for m, run in sorted(runs.items()):
                steps = np.arange(offset + 1, offset + len(run["reward"]) + 1)
                ax_r.plot(steps, run["reward"], color=color, alpha=0.8 if m == "0" else 0.4, lw=1,
                          label=f"{job}" if (i, m) == ("1", "0") else None)
            offset += len(run["reward"])
            ax_r.axvline(offset + 0.5, color="gray", lw=0.5)
    ax_r.set(xlabel="RL step (iterations one after the other)", ylabel="training reward (reward model)",
             title="RL training: both runs of each iteration")
    ax_r.legend(fontsize=7)
    ax_r.grid(alpha=0.3)
    fig.savefig(path, dpi=90)
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
        stages("judge", out("judge", "config.json"), lambda: judge_stage(args, out("tokenizers", "policy")),
               after=["prepare", "sft"])
        stages("diagnose", out("sft", "config.json"), lambda: diagnose_stage(args), after=["sft", "reward", "judge"])
        stages("signal", out("sft", "config.json"), lambda: signal_stage(args), after=["sft", "reward", "judge"])
        models = ["prepare", "sft", "reward"]  # what every WARP job is computed from
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
                                after=models + ["judge"] + jobs))
    except (DataError, hub.CheckpointError, ValueError) as e:
        fail("reproduce.py", e)
    start = time.perf_counter()
    markdown, plotted = report(args, stages, evals)
    print(f"\n=== report: {time.perf_counter() - start:.1f}s\n\n{markdown}")
    print(f"this invocation: {time.perf_counter() - total:.0f}s ({len(stages.ran)} stages run, the others done earlier)")
    print(f"wrote {out('results.json')}, {out('results.md')}" + (f", {out('pareto.png')}" if plotted else ""))


if __name__ == "__main__":
    main()
