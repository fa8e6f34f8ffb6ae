"""
WARP on real IMDB reviews, on a laptop CPU, offline, in one command: tiny policy, reward model and
independent judge trained from scratch, a diagnosis of what RL can learn, WARP with REINFORCE and
RLOO, the evaluation, the tables, the plots, and the paper's claims checked, every stage timed.

    python reproduce.py --source aclImdb_v1.tar.gz                 # one seed
    python reproduce.py --source aclImdb_v1.tar.gz --seeds 0 1 2    # three
    python reproduce.py --setting sentiment --source ... --seeds 0 1 2    # what WARP does to sentiment

Three settings (nanowarp/study/tiny.py SETTINGS): `fast` (the default, ~12 minutes a seed) runs the whole
pipeline at 40 new tokens, where what RL learns is to end the review in time; `sentiment` runs at
60 new tokens, where the SFT model ends every completion and only sentiment is left to learn, with
ten times the completions per RL run (WARP + RLOO and its fixed-anchor ablation); `demo` (`make demo`'s)
is the sentiment setting with runs half as long and no ablation.

Only the models are small (nanowarp/study/tiny.py); every stage is the package's ordinary code path and
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
  7. warp        nanowarp.warp.warp, as train.py runs it: fast: REINFORCE (I = 3), RLOO k = 4 (I = 2), and
                 the fixed-anchor ablation (I = 1); sentiment: RLOO k = 4 (I = 2) and its fixed-anchor
                 ablation (I = 1); each prints the train.py command that runs the same job
  8. evaluate    KL (sampled and exact), reward, judge, held-out NLL and distinct-n on the eval prompts,
                 for every checkpoint, the LITI sweep SFT → SLERP of each iteration of the main job, the
                 LERP of its iteration 1's runs, and best-of-N of the SFT model (in --workers processes)
  9. report      OUT/results.json, OUT/results.md and OUT/pareto.png (matplotlib, when installed): the
                 headline, the tables and the paper's claims checked (nanowarp/study/report.py, nanowarp/study/claims.py)

A finished stage is recorded in OUT/stages.json and skipped when the command runs again, so an
interrupted reproduction resumes (a WARP job also resumes inside itself), and `--seeds 0 1 2` after
`--seeds 0` only adds seeds 1 and 2. Delete a stage's output folder to redo it: the stages computed
from it are then redone too (a seed's evaluation after its WARP jobs; every WARP job, from scratch,
after the SFT or reward model; the evaluations after the judge). Other sizes or budgets need another
--out_dir (OUT/settings.json holds the flags, and a change is refused).
"""

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)  # run from anywhere without installing

from nanowarp import hub  # noqa: E402
from nanowarp.config import (PRESETS, Config, changed_flags, command_line, fail, flag,  # noqa: E402
                             parse_args as parse_flags, resolve_device)
from nanowarp.data import IMDB_URL, DataError, clean, prepare, read_imdb  # noqa: E402
from nanowarp.hub import write_json  # noqa: E402
from nanowarp.jobs.parallel import WorkerError  # noqa: E402
from nanowarp.models.gpt2 import GPT2  # noqa: E402
from nanowarp.signals import Interrupted, stop_on_signals  # noqa: E402
from nanowarp.study import tiny  # noqa: E402
from nanowarp.study.diagnose import diagnose, gradient_signal  # noqa: E402
from nanowarp.study.evaluation import evaluate_seed  # noqa: E402
from nanowarp.study.report import write_results  # noqa: E402
from nanowarp.study.stages import Stages  # noqa: E402
from nanowarp.study.tiny import job_settings, jobs, main_job  # noqa: E402
from nanowarp.supervised import train_reward_model, train_sft  # noqa: E402
from nanowarp.tokenizer import load_tokenizer  # noqa: E402
from nanowarp.warp import warp  # noqa: E402


@dataclass
class Args:
    setting: str = flag("fast", "fast: the pipeline in minutes, 40 new tokens (RL learns to end in time); sentiment: "
                                "60 new tokens, only sentiment to learn, 10x the completions per run; demo: sentiment "
                                "with T = 300 and no ablation (tiny.SETTINGS)",
                        choices=list(tiny.SETTINGS))
    source: str = flag(IMDB_URL, "IMDB: the official aclImdb_v1.tar.gz URL, a local copy, or the folder it extracts to")
    out_dir: str = flag(None, "where everything goes; None: runs/tiny (fast) or runs/sentiment")
    seeds: tuple = flag((0,), "WARP seeds (each adds its WARP jobs and evaluation); seed s is train.py --seed 100*s",
                        nargs="+", type=int)
    device: str = flag("auto", "cpu, cuda, cuda:N, or auto")
    threads: int = flag(1, "CPU threads per process; 0 = PyTorch's default. Models this small run faster on one "
                           "thread per process than on two")
    workers: int = flag(2, "processes side by side: the SFT and reward stages, and (train.py --workers) the M runs "
                           "of a WARP iteration")
    ablations: bool = flag(True, "also train the fixed-anchor WARP job (the EMA-vs-fixed-anchor claim)")
    best_of: tuple = flag(None, "best-of-N of the SFT model evaluated for each N (eval.py --best_of); None: the "
                                "setting's (1 2 4 8 16)", nargs="+", type=int)
    # sizes and budgets; the defaults are nanowarp/study/tiny.py's
    policy_vocab: int = flag(tiny.POLICY_VOCAB, "BPE vocabulary of the policy")
    reward_vocab: int = flag(tiny.REWARD_VOCAB, "WordPiece vocabulary of the reward model")
    policy_layers: int = flag(tiny.GPT2_ARCH["n_layer"], "GPT-2 layers")
    policy_width: int = flag(tiny.GPT2_ARCH["n_embd"], "GPT-2 width (4 heads)")
    reward_layers: int = flag(tiny.DISTILBERT_ARCH["n_layers"], "DistilBERT layers")
    reward_width: int = flag(tiny.DISTILBERT_ARCH["dim"], "DistilBERT width (2 heads, FFN 4x wider)")
    sft_epochs: float = flag(tiny.SFT["epochs"], "passes over the training reviews of the SFT stage")
    reward_epochs: float = flag(tiny.REWARD["epochs"], "passes over the training reviews of the reward stage")
    judge_epochs: float = flag(tiny.JUDGE["epochs"], "passes over its half of the training reviews of the judge")
    steps: int = flag(None, "T: RL steps per WARP run; None: the setting's (fast 60, sentiment 600, demo 300)", type=int)
    batch_size: int = flag(None, "completions per RL step; None: the preset's (64 in both)", type=int)
    max_new_tokens: int = flag(None, "completion length, in RL and evaluation; None: the preset's (fast 40, "
                                     "sentiment 60)", type=int)
    n_eval: int = flag(1000, "eval prompts: the first N test reviews of at least 200 characters in eval order (the "
                             "reference's 100, all negative, then positive and negative alike)")
    n_reference: int = flag(100, "the table of SPEC §2 (KL, reward) also on the first N eval prompts, the reference's")
    heldout: int = flag(500, "held-out NLL (forgetting) on this many test reviews, evenly spaced")
    samples: int = flag(3, "sample completions kept per model of the table")
    etas: tuple = flag(tuple(round(i / 5, 10) for i in range(6)), "eta values of each LITI sweep, in [0, 1] "
                       "(as eval.py --etas)", nargs="+", type=float)
    ppl_reviews: int = flag(2500, "SFT perplexity on this many test reviews, evenly spaced; 0 = all")
    accuracy_reviews: int = flag(0, "reward-model accuracy on this many test reviews, evenly spaced; 0 = all 25,000")
    save_every: int = flag(0, "the judge stage saves its training state every N steps, to resume inside it after "
                              "Ctrl-C / SIGTERM or a crash (as train.py --save_every); 0 = off")


def parse_args(argv=None):
    """The flags, with those left at None set from the --setting (tiny.SETTINGS and its preset)."""
    args = parse_flags(argv, Args, presets=None, description=__doc__)
    setting, preset = tiny.SETTINGS[args.setting], PRESETS[tiny.SETTINGS[args.setting]["preset"]]
    defaults = dict(out_dir=setting["out_dir"], best_of=setting["best_of"],
                    **{k: setting.get(k, preset[k]) for k in ("steps", "batch_size", "max_new_tokens")})
    return dataclasses.replace(args, **{k: v for k, v in defaults.items() if getattr(args, k) is None})


# flags that change no result: a resumed reproduction may change them
RESUME_FREE = ("source", "out_dir", "seeds", "device", "threads", "workers", "save_every")


def check_settings(args):
    """OUT/settings.json holds the flags of the reproduction in OUT; different ones are refused,
    since the stages done earlier would not be redone with them."""
    path = os.path.join(args.out_dir, "settings.json")
    settings = {k: v for k, v in dataclasses.asdict(args).items() if k not in RESUME_FREE}
    settings = json.loads(json.dumps(settings))  # as read back: tuples become lists
    if os.path.isfile(path):
        differing = changed_flags(json.load(open(path)), settings)
        if differing:
            fail("reproduce.py", f"{args.out_dir} holds a reproduction with other settings: {', '.join(differing)}. "
                                 f"Use its settings to resume it, or another --out_dir")
    write_json(path, settings)


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
                  log_every=25, save_every=args.save_every, **overrides)


def stoppable(what, fn, *fn_args):
    """fn(*fn_args), which Ctrl-C / SIGTERM stop at the end of a step: then exit 130 / 143, saying
    that the same command resumes `what`."""
    try:
        with stop_on_signals():
            return fn(*fn_args)
    except Interrupted as e:
        print(f"reproduce.py: {e}: run the same command again to resume {what}", file=sys.stderr)
        sys.exit(e.exit_code)  # 130 (SIGINT) or 143 (SIGTERM)


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
    lm = GPT2.from_pretrained(os.path.join(args.out_dir, "sft"))
    GPT2(lm.config)  # the random draws loading made before it built on the meta device: the same new head as then
    model = tiny.gpt2_classifier_from(lm)
    cfg = stage_config(args, {**tiny.JUDGE, "epochs": args.judge_epochs})
    where = f"the judge (from its training state, {os.path.join(args.out_dir, 'judge', 'state.pt')})" \
        if args.save_every else "the judge (from its start: --save_every N saves its state)"
    accuracy = stoppable(where, lambda: train_reward_model(
        cfg, resolve_device(args.device), model=model, tokenizer_folder=tokenizer_folder,
        test_limit=args.accuracy_reviews or None, name="judge"))
    return dict(test_accuracy=accuracy, test_reviews=args.accuracy_reviews or 25000, weights=n_weights(model))


def diagnose_stage(args):
    """How the classifiers read texts of the completions' length, and the sentiment words of the SFT
    model's completions (nanowarp/study/diagnose.py)."""
    return diagnose(args.out_dir, args.max_new_tokens)


def signal_stage(args):
    """The policy-gradient signal of each reward at the SFT model (nanowarp/study/diagnose.py)."""
    return gradient_signal(args.out_dir, args.max_new_tokens)


def n_weights(model):
    return sum(p.numel() for p in model.parameters())


# ---- stage 5: WARP, the package's own job, as train.py runs it ---------------------------------

def warp_job(args, seed, job, fresh=False):
    """Seed `seed`'s WARP job `job` in OUT/seed_{seed}/{job}, resumed if it was cut short (fresh: started
    over); returns its per-step training metrics."""
    out = os.path.join(args.out_dir, f"seed_{seed}", job)
    cfg = Config(policy=os.path.join(args.out_dir, "sft"), reward_model=os.path.join(args.out_dir, "reward_model"),
                 data=os.path.join(args.out_dir, "data"), out_dir=out, seed=100 * seed, device=args.device,
                 workers=args.workers, threads=args.threads, log_every=max(1, args.steps // 4), fresh=fresh,
                 **job_settings(args, job))
    print("$ " + command_line(cfg, "train.py"), flush=True)  # the same job, from the command line
    try:
        stoppable(f"the WARP job in {out}", warp, cfg)  # Ctrl-C / SIGTERM: the runs stop at the end of a step
    except (ValueError, hub.CheckpointError, DataError, FloatingPointError, WorkerError, hub.DiskFullError) as e:
        fail("reproduce.py", f"the WARP job in {out}: {e}; run the command again to resume it")
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


# ---- stage 6 is nanowarp/study/evaluation.py; stage 7: the report (nanowarp/study/report.py) --------------------------------------------------

def report(args, stages, evals):
    """results.json, results.md and pareto.png in OUT; returns the markdown, and whether it plotted."""
    done = stages.done
    settings = dict(setting=args.setting, warp=job_settings(args, main_job(args)), jobs=tiny.SETTINGS[args.setting]["jobs"],
                    best_of=args.best_of, sft=done["sft"]["result"],
                    reward=done["reward"]["result"], judge=done["judge"]["result"], n_eval=args.n_eval,
                    source=os.path.basename(args.source))
    return write_results(args, stages, evals, settings)


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
        stoppable("the SFT and reward stages", lambda: stages.side_by_side(  # Ctrl-C / SIGTERM: at a step end
            [("sft", out("sft", "config.json"), sft_stage, args, out("tokenizers", "policy")),
             ("reward", out("reward_model", "config.json"), reward_stage, args, out("tokenizers", "reward"))],
            args.workers, args.threads, after=["tokenizers", "prepare"]))
        stages("judge", out("judge", "config.json"), lambda: judge_stage(args, out("tokenizers", "policy")),
               after=["prepare", "sft"])
        stages("diagnose", out("sft", "config.json"), lambda: diagnose_stage(args), after=["sft", "reward", "judge"])
        stages("signal", out("sft", "config.json"), lambda: signal_stage(args), after=["sft", "reward", "judge"])
        models = ["prepare", "sft", "reward"]  # what every WARP job is computed from
        evals = []
        for seed in args.seeds:
            for job in jobs(args):
                name, iterations = f"seed_{seed}/{job}", job_settings(args, job)["iterations"]
                # a job whose models were redone starts over (--fresh) instead of resuming
                fresh = bool(stages.stale(name, models))
                stages(name, out(f"seed_{seed}", job, f"iter_{iterations}", "liti", "config.json"),
                       lambda: warp_job(args, seed, job, fresh), after=models)
            evals.append(stages(f"seed_{seed}/evaluate", out(f"seed_{seed}"), lambda: evaluate_seed(args, seed),
                                after=models + ["judge"] + [f"seed_{seed}/{job}" for job in jobs(args)]))
    except (DataError, hub.CheckpointError, ValueError) as e:
        fail("reproduce.py", e)
    start = time.perf_counter()
    markdown, plotted = report(args, stages, evals)
    print(f"\n=== report: {time.perf_counter() - start:.1f}s\n\n{markdown}")
    print(f"this invocation: {time.perf_counter() - total:.0f}s ({len(stages.ran)} stages run, the others done earlier)")
    print(f"wrote {out('results.json')}, {out('results.md')}" + (f", {out('pareto.png')}" if plotted else ""))


if __name__ == "__main__":
    main()
