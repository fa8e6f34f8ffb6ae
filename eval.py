"""
Evaluate policies as the WARP paper plots them: KL to a reference policy (x) against reward (y).

For every model in --models, and every η of an optional LITI sweep between two checkpoints
(--sweep A B: (1 − η)·A + η·B, merged in memory, nothing written), one completion per eval
prompt is sampled and scored:

    KL     = mean over prompts of Σ_k [log π(y_k|x, y_<k) − log π_ref(y_k|x, y_<k)]   (tokens up to EOS)
    reward = mean of P(positive | x + y) under --reward_model, −1 for a completion without EOS

and, along the same samples: kl_exact (the full-vocabulary KL at each position, summed: never
negative), distinct_1 / distinct_2 (distinct unigrams / bigrams of completion tokens over all
completions, divided by their counts), with --judge the mean P(positive) under an independent
classifier over all completions (no −1 rule), with --heldout N the mean NLL per token of N
held-out test reviews (forgetting).

--best_of N [N ...] adds the reference front of RLHF papers: for each N, best-of-N of --ref (N
completions per prompt from --ref, the reward model keeps its favourite, ties to the first), at the
analytic KL log N − (N − 1)/N. The completions are drawn once for the largest N and every smaller N
keeps the best of the first N, so the rows are nested; best-of-1 is --ref's own row.

All models use the same seed, hence the same random numbers, batch by batch: their differences are
less noisy than independent draws. A model folder of a train.py job (OUT/iter_i/NAME, next to
OUT/job.json) is scored with that job's --temperature, --reward_kind, --no_eos_penalty and
--reward_label unless they are given here. --prompts PATH evaluates on a prompt file instead of
--data. Writes --out (a JSON list, one object per model or sweep point) after each model, prints a
table, and plots the points when matplotlib is installed. Until it is done it also keeps
--out.partial (the arguments and the rows so far): run again with the same arguments after a crash,
it continues with the models and sweep points it has not finished.

    python eval.py --models runs/warp/iter_1/liti runs/warp/iter_2/liti --ref lvwerra/gpt2-imdb \\
        --sweep lvwerra/gpt2-imdb runs/warp/iter_2/slerp --best_of 1 2 4 8 16 --n_prompts 100 --out results.json
"""

import dataclasses
import json
import os
import time
from dataclasses import dataclass

import torch

from nanowarp import hub, merging
from nanowarp.config import (RewardFlags, default_reward_model, fail, flag, keep_api_key, parse_args as parse_flags,
                             penalty, prompt_key_flag, resolve_device, same_flag, truncate_prompts_flag)
from nanowarp.data import DataError, load_meta, load_prepared_prompts
from nanowarp.evaluate import best_of_n, evaluate, heldout_sequences, liti_sweep
from nanowarp.logger import Logger, check_report_to
from nanowarp.models import eos_ids, from_config, from_pretrained, load_config
from nanowarp.plots import plot
from nanowarp.prompts import load_prompt_dataset, max_prompt_tokens
from nanowarp.reward import RewardError, RewardModel, eos_penalty, load_reward
from nanowarp.sampling import first_eos
from nanowarp.tokenizer import EOS, load_tokenizer


@dataclass
class Args(RewardFlags):
    models: tuple = flag(None, "policies to evaluate: checkpoint folders or Hub ids (and/or --sweep)", nargs="+",
                         metavar="DIR")
    ref: str = flag("lvwerra/gpt2-imdb", "reference policy of the KL (the SFT model); its tokenizer decodes",
                    metavar="DIR")
    reward_model: str = same_flag("reward_model")
    data: str = flag("data/imdb/prepared", "folder written by data/imdb/prepare.py (its eval prompts are used)",
                     metavar="DIR")
    n_prompts: int = flag(100, "evaluate on the first N eval prompts", type=int, metavar="N")
    seed: int = flag(0, "sampling seed (the same for every model)", type=int, metavar="S")
    out: str = flag("results.json", "where the results go (JSON list, one object per model / sweep point)",
                     metavar="PATH")
    max_new_tokens: int = flag(128, "maximum completion length; no EOS by then = reward -1", type=int,
                               metavar="N")
    temperature: float = flag(None, "sampling temperature, also used for both log-probs of the KL; None: the "
                                    "train.py job's (see --reward_kind), else 1", type=float, metavar="T")
    reward_kind: str = flag(None, "prob = P(rewarded label), logit = its raw logit; None: the job's, else prob",
                            choices=["prob", "logit"])
    no_eos_penalty: float = flag(None, "reward of a completion without EOS, or none; None: the job's, else -1",
                                 type=penalty, metavar="R|none")
    reward_label: str = flag(None, "the reward model's rewarded label, a name or an index; None: the job's, else the "
                                   "one named POSITIVE", metavar="NAME")
    prompts: str = flag(None, "prompt dataset to evaluate on instead of --data's eval prompts: text, one per line; "
                              ".jsonl, .json or .parquet rows, a \"prompt\" string or \"messages\" each "
                              "(docs/usage.md#prompt-datasets)", metavar="PATH")
    prompt_key: str = prompt_key_flag()
    truncate_prompts: str = truncate_prompts_flag("--ref's context")
    chat_template: bool = flag(False, "give each prompt as a user turn of --ref's chat template "
                                      "(tokenizer_config.json; pip install jinja2), as train.py --chat_template does")
    samples: int = flag(0, "store the first K completions of each model (prompt, completion, reward, kl) in --out",
                        type=int, metavar="K")
    report_to: str = flag("none", "also log the results to tensorboard (in --out's folder) or wandb",
                          choices=["none", "tensorboard", "wandb"])
    batch_size: int = flag(64, "prompts sampled together", type=int, metavar="B")
    device: str = flag("auto", "cpu, cuda, cuda:N, or auto")
    dtype: str = flag("float32", "bfloat16: the policies, --ref and the reward model run in bf16; log-probs, KL "
                                 "and --sweep's merges stay float32", choices=["float32", "bfloat16"])
    sweep: tuple = flag(None, "also evaluate the LITI sweep (1 - eta) A + eta B, merged in memory", nargs=2,
                        metavar=("A", "B"))
    etas: tuple = flag(tuple(round(i / 10, 10) for i in range(11)), "eta values of --sweep, in [0, 1]",
                       nargs="+", type=float, metavar="E")
    judge: str = flag(None, "independent sentiment classifier (DistilBERT or GPT-2, Hugging Face layout): rows "
                            "gain judge, its mean P(positive) over all completions", metavar="DIR")
    heldout: int = flag(0, "rows gain heldout_nll: mean NLL per token of N test reviews of --data (0: off)",
                        type=int, metavar="N")
    best_of: tuple = flag(None, "also rows for best-of-N of --ref for each N: N completions per prompt, the reward "
                                "model keeps one; KL log N - (N-1)/N", nargs="+", type=int, metavar="N")
    plot: str = flag(None, "KL-reward plot (PNG); None: --out with .png when matplotlib is installed; "
                           "'none': no plot", metavar="PNG")

    def __post_init__(self):
        self.reward_model = default_reward_model(self)
        self.reward_api_key = keep_api_key(self.reward_api_key)


# evaluate()'s metrics beyond KL and reward, copied into each row when present
NEW_METRICS = ("kl_exact", "kl_exact_se", "distinct_1", "distinct_2", "judge", "judge_se", "heldout_nll")


def parse_args(argv=None):
    return parse_flags(argv, Args, presets=None, description=__doc__)


def validate(args):
    checks = [
        (args.models or args.sweep or args.best_of, "nothing to evaluate: give --models, --sweep A B, --best_of N, "
                                                    "or several"),
        (not args.best_of or min(args.best_of) >= 1, f"--best_of takes N >= 1, got {args.best_of}"),
        (args.n_prompts >= 1, f"--n_prompts must be >= 1, got {args.n_prompts}"),
        (args.max_new_tokens >= 1, f"--max_new_tokens must be >= 1, got {args.max_new_tokens}"),
        (args.temperature is None or args.temperature > 0, f"--temperature must be > 0, got {args.temperature}"),
        (args.samples >= 0, f"--samples must be >= 0, got {args.samples}"),
        (args.batch_size >= 1, f"--batch_size must be >= 1, got {args.batch_size}"),
        (args.heldout >= 0, f"--heldout must be >= 0, got {args.heldout}"),
        (all(0 <= eta <= 1 for eta in args.etas), f"--etas must lie in [0, 1], got {args.etas}"),
    ]
    for ok, message in checks:
        if not ok:
            fail("eval.py", message)
    try:
        check_report_to(args.report_to)
    except ValueError as e:
        fail("eval.py", str(e))


# What a policy is scored with: a train.py job's own values for its checkpoints, unless given here.
JOB_SETTINGS = dict(temperature=1.0, reward_kind="prob", no_eos_penalty=-1.0, reward_label=None)


def scoring_settings(args, name):
    """{setting: value} for model `name`: the flag if given, else the value of the train.py job the
    folder belongs to (OUT/iter_i/NAME/ with OUT/job.json), else the default; says so when the job's are used."""
    path = os.path.join(name, os.pardir, os.pardir, "job.json")
    job = {}
    if os.path.isdir(name) and os.path.isfile(path):
        with open(path) as f:
            job = json.load(f)
    values = {k: getattr(args, k) if getattr(args, k) is not None else job.get(k, default)
              for k, default in JOB_SETTINGS.items()}
    used = [f"--{k} {values[k]}" for k in JOB_SETTINGS if getattr(args, k) is None and k in job]
    if used:
        print(f"note: {name} belongs to the train.py job in {os.path.normpath(os.path.dirname(path))}: scored with "
              f"its {', '.join(used)} (give the flags to override)")
    return values


def load_policy(name, role, ref=None, dtype=torch.float32):
    """A policy (any models.from_pretrained architecture) from a folder or Hub id, in dtype (read
    into it: a bf16 policy is never held in float32); with ref, check it shares ref's vocabulary."""
    try:
        model = from_pretrained(name, dtype)
    except hub.CheckpointError as e:
        fail("eval.py", f"{role} {name}: {e}")
    if ref is not None and (model.config.vocab_size, model.config.eos_token_id) != \
            (ref.config.vocab_size, ref.config.eos_token_id):
        fail("eval.py", f"{role} {name} has vocab_size={model.config.vocab_size}, eos={model.config.eos_token_id} "
                        f"but --ref has vocab_size={ref.config.vocab_size}, eos={ref.config.eos_token_id}: the KL "
                        f"needs one vocabulary")
    return model


def check_prompts(prompts, args, ref, tokenizer):
    """The prompts fit the reference tokenizer (their lengths are checked as they are loaded)."""
    meta_eos = None if args.prompts else load_meta(args.data).get("eos_token_id")  # the data tokenizer's EOS
    if meta_eos is not None and meta_eos != tokenizer.token_to_id(EOS):
        fail("eval.py", f"{args.data} was prepared with a tokenizer whose {EOS} is {meta_eos}, but --ref's is "
                        f"{tokenizer.token_to_id(EOS)}: prepare the data with the policy's tokenizer")
    if max(max(p) for p in prompts) >= ref.config.vocab_size:
        fail("eval.py", f"{args.data} holds token ids beyond --ref's vocabulary ({ref.config.vocab_size}): "
                        f"prepare the data with the policy's tokenizer")


def best_of_name(n, ref):
    """The model name of a best-of-N row."""
    return f"best-of-{n}({ref})"


def load_progress(path, args):
    """{model: row} done by an earlier run with the same arguments that did not finish, else {}."""
    try:
        with open(path, encoding="utf-8") as f:
            progress = json.load(f)
        if progress["args"] == json.loads(json.dumps(vars(args))):
            return {row["model"]: row for row in progress["rows"]}
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no earlier run, another one, or a file damaged: start over
    return {}


def print_table(rows):
    width = max([len("model")] + [len(r["model"]) for r in rows])
    extra = [k for k in ("judge", "heldout_nll") if any(k in r for r in rows)]

    def cell(r, k, fmt, w):
        return f"{r[k]:{fmt}}" if k in r else f"{'-':>{w}}"  # best-of-N rows have no exact KL or held-out NLL

    print(f"{'model':<{width}}  {'KL':>8}  {'KL exact':>8}  {'reward':>8}  {'finished':>8}  {'length':>7}  "
          f"{'dist-1':>6}  {'dist-2':>6}" + "".join(f"  {k:>11}" for k in extra))
    for r in rows:
        print(f"{r['model']:<{width}}  {r['kl']:8.3f}  {cell(r, 'kl_exact', '8.3f', 8)}  {r['reward']:+8.3f}  "
              f"{r['finished']:8.2f}  {r['length']:7.1f}  {r['distinct_1']:6.3f}  {r['distinct_2']:6.3f}" +
              "".join(f"  {cell(r, k, '11.3f', 11)}" for k in extra))


def main(argv=None):
    try:
        run(argv)
    except RewardError as e:  # a reward function or server that failed: the rows done are kept
        fail("eval.py", f"{e}; the models done are kept: the same command resumes")


def run(argv=None):
    args = parse_args(argv)
    validate(args)

    # 1. inputs: fail on a missing folder, missing data or a prompt too long before loading anything large
    try:
        if not args.prompts:
            load_meta(args.data)
        for name in (*(args.models or ()), *(args.sweep or ()), args.ref,
                     *([args.reward_model] if args.reward_model else []), *([args.judge] if args.judge else [])):
            hub.resolve(name)
        folder = hub.resolve(args.ref)  # its tokenizer (it also decodes completions), chat template and context
        tokenizer = load_tokenizer(folder)
        fit = dict(template=folder, chat=args.chat_template, truncate=args.truncate_prompts, limit=args.n_prompts,
                   max_tokens=max_prompt_tokens(load_config(folder).n_positions, args.max_new_tokens))
        prompts = load_prompt_dataset(args.prompts, tokenizer, args.prompt_key, **fit).ids if args.prompts else \
            load_prepared_prompts(args.data, "eval", tokenizer, **fit)
    except (DataError, hub.CheckpointError, ValueError) as e:
        fail("eval.py", str(e))
    if args.n_prompts > len(prompts):
        print(f"note: {args.prompts or args.data} has {len(prompts)} eval prompts, fewer than --n_prompts {args.n_prompts}: using all")
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    ref = load_policy(args.ref, "--ref", dtype=dtype).to(device).eval()
    eos_id = eos_ids(args.ref, ref.config)  # an id, or generation_config.json's list of them
    try:
        check_prompts(prompts, args, ref, tokenizer)
        reward = load_reward(args, device, dtype, args.batch_size)
        reward_model = reward.sources[0] if args.reward_model else None
        judge = RewardModel(args.judge, device, batch_size=args.batch_size, dtype=dtype) if args.judge else None
        heldout = heldout_sequences(args.data, args.heldout, tokenizer, ref.config.n_positions,
                                    first_eos(eos_id)) if args.heldout else None
    except (DataError, hub.CheckpointError, ValueError) as e:
        fail("eval.py", str(e))
    logger = Logger(args.report_to, os.path.dirname(os.path.abspath(args.out)), "eval", dataclasses.asdict(args))

    def settings(name):
        """evaluate()'s keyword arguments for model `name`, the reward model set to score as its job did."""
        scoring = scoring_settings(args, name)
        try:
            if reward_model is not None:
                reward_model.set_scoring(scoring["reward_kind"], scoring["reward_label"])
        except (ValueError, hub.CheckpointError) as e:
            fail("eval.py", str(e))
        reward.no_eos_penalty = eos_penalty(scoring["no_eos_penalty"])
        return scoring, dict(max_new_tokens=args.max_new_tokens, temperature=scoring["temperature"],
                             batch_size=args.batch_size, seed=args.seed, samples=args.samples,
                             judge=judge, heldout=heldout)
    print(f"evaluating on {len(prompts)} prompts of {args.prompts or args.data}, KL to {args.ref}, "
          f"reward {', '.join(reward.names)}, "
          f"device {device}")

    rows, last = [], time.perf_counter()
    progress = args.out + ".partial"
    done = load_progress(progress, args)  # rows of an earlier run with these arguments, cut short
    if done:
        print(f"resuming: {len(done)} results from {progress} (an earlier run with the same arguments)")

    def keep(row):
        """Add a row; rewrite --out and --out.partial atomically (a crash keeps what is done)."""
        rows.append(row)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        try:
            hub.write_json(progress, dict(args=vars(args), rows=rows))
            hub.write_json(args.out, rows)
        except hub.DiskFullError as e:
            fail("eval.py", str(e))

    def record(name, result, scoring, **extra):
        """Keep a new row (--out, --out.partial, the logger), print a progress line."""
        nonlocal last
        row = dict(model=name, kl=result["kl"], reward=result["reward"], finished=result["finished"],
                   length=result["length"], n_prompts=result["n"], kl_se=result.get("kl_se"),
                   reward_se=result["reward_se"], **{k: result[k] for k in NEW_METRICS if k in result},
                   **extra, **scoring, max_new_tokens=args.max_new_tokens, seed=args.seed,
                   **({"samples": result["samples"]} if "samples" in result else {}))
        keep(row)
        logger.scalars({k: row[k] for k in ("kl", "reward", "finished", "length")}, len(rows) - 1)
        if "samples" in row:
            logger.completions(row["samples"], len(rows) - 1)
        seconds, last = time.perf_counter() - last, time.perf_counter()
        print(f"{name}: KL {row['kl']:.3f} reward {row['reward']:+.3f} finished {row['finished']:.2f} "
              f"length {row['length']:.1f} ({seconds:.1f}s)", flush=True)

    # 2. each model: sample, score, KL to the reference
    for name in args.models or ():
        if name in done:
            keep(done[name])
            continue
        policy = load_policy(name, "--models", ref, dtype).to(device).eval()
        scoring, kwargs = settings(name)
        record(name, evaluate(policy, ref, reward, prompts, tokenizer, eos_id, **kwargs), scoring)
        del policy  # before loading the next one

    # 3. the LITI sweep (1 − η) A + η B, one model in memory whose weights change with η
    a, b = args.sweep or (None, None)

    def point(eta):
        return f"liti({a},{b},eta={eta:g})"

    for eta in args.etas if args.sweep else ():
        if point(eta) in done:
            keep(done[point(eta)])
    etas = [eta for eta in args.etas if point(eta) not in done]
    if args.sweep and etas:
        model_a, model_b = load_policy(a, "--sweep", ref), load_policy(b, "--sweep", ref)
        theta_a, theta_b = model_a.hf_state_dict(), model_b.hf_state_dict()
        try:
            merging.check_compatible([theta_a, theta_b], [f"--sweep {a}", f"--sweep {b}"],
                                     [model_a.config, model_b.config])
        except ValueError as e:
            fail("eval.py", str(e))
        policy = from_config(model_a.config).to(device, dtype).eval()  # a third model: theta_a shares model_a's storage
        scoring, kwargs = settings(b)  # scored as B's job was trained
        liti_sweep(theta_a, theta_b, etas, policy, ref, reward, prompts, tokenizer, eos_id,
                   log=lambda eta, result: record(point(eta), result, scoring, eta=eta, sweep=f"liti({a},{b})"),
                   **kwargs)

    # 4. best-of-N of the reference: every N from one draw of max(N) completions per prompt
    names = {n: best_of_name(n, args.ref) for n in sorted(set(args.best_of or ()))}
    if names and all(name in done for name in names.values()):
        for name in names.values():
            keep(done[name])
    elif names:
        scoring, kwargs = settings(args.ref)
        for result in best_of_n(ref, reward, prompts, tokenizer, eos_id, list(names),
                                **{k: kwargs[k] for k in ("max_new_tokens", "temperature", "batch_size", "seed", "judge")}):
            record(names[result["best_of"]], result, scoring, best_of=result["best_of"])

    logger.close()
    if os.path.exists(progress):
        os.remove(progress)  # done: --out is complete
    print_table(rows)
    print(f"wrote {args.out}")
    plot_path = args.plot if args.plot is not None else os.path.splitext(args.out)[0] + ".png"
    if plot_path.lower() != "none" and plot(rows, plot_path):
        print(f"wrote {plot_path}")


if __name__ == "__main__":
    main()
