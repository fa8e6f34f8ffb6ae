"""
Stage 6 of the reproduction: a seed's evaluation. Every checkpoint of the seed's WARP jobs, each
iteration's LITI sweep SFT → SLERP, iteration 1's LERP of the same runs (and its sweep) and best-of-N
of the SFT model, each a row of KL, reward, judge, held-out NLL and distinct-n (nanowarp.evaluate), in
--workers processes; and the task vectors' geometry of every merge.
"""

import concurrent.futures
import multiprocessing
import os
import time

import torch

from nanowarp import merging
from nanowarp.config import resolve_device
from nanowarp.data import load_prompts
from nanowarp.evaluate import best_of_n, evaluate, heldout_sequences
from nanowarp.models import from_config, from_pretrained, load_theta
from nanowarp.reward import Reward, RewardModel
from nanowarp.study.report import table_models
from nanowarp.study.tiny import job_settings, jobs, main_job
from nanowarp.tokenizer import load_tokenizer


def seed_plan(args, seed):
    """What the seed's evaluation computes, in one walk over its jobs' iterations:

    tasks     (name, recipe, extra): every checkpoint of the seed's jobs, each iteration's LITI sweep
              SFT → SLERP, and iteration 1's LERP of the same runs (and its sweep); a recipe says how
              to build the weights (recipe_theta), extra goes into the row (sweep, eta);
    geometry  {name: (θ_init folder, run folders, recipe of the merge)}: the task vectors of each
              iteration's runs, measured against the SLERP (and for iteration 1, the LERP)."""
    sft, main = os.path.join(args.out_dir, "sft"), main_job(args)
    # best-of-N first: the longest task, started while the other process takes the rest
    tasks, geometry = [("best-of-N", ("best_of", tuple(args.best_of)), {})] if args.best_of else [], {}
    tasks.append(("sft", ("load", sft), {}))

    def sweep(name, end):
        tasks.extend((f"{name} eta={eta:g}", ("liti", sft, end, eta), dict(sweep=name, eta=eta)) for eta in args.etas)

    for job in jobs(args):
        theta_init = sft
        for i in range(1, job_settings(args, job)["iterations"] + 1):
            folder = os.path.join(args.out_dir, f"seed_{seed}", job, f"iter_{i}")
            runs = [os.path.join(folder, f"run_{m}") for m in (0, 1)]
            tasks += [(f"{job}/iter_{i}/{name}", ("load", os.path.join(folder, name)), {})
                      for name in ("run_0", "run_1", "slerp", "liti")]
            geometry[f"{job}/iter_{i}"] = (theta_init, runs, ("load", os.path.join(folder, "slerp")))
            if job in (main, "fixed_anchor"):
                sweep(f"{job}/iter_{i}/slerp", ("load", os.path.join(folder, "slerp")))
            if job == main and i == 1:  # SLERP vs LERP, on the same two runs
                lerp = ("lerp", theta_init, runs)
                tasks.append((f"{main}/iter_1/lerp", lerp, {}))
                sweep(f"{main}/iter_1/lerp", lerp)
                geometry[f"{main}/iter_1/lerp"] = (theta_init, runs, lerp)
            theta_init = os.path.join(folder, "liti")
    return tasks, geometry


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
    ref = from_pretrained(sft_dir).to(device).eval()
    tokenizer, eos = load_tokenizer(sft_dir), ref.config.eos_token_id
    prompts = load_prompts(data, "eval")
    _EVAL.update(
        ref=ref, tokenizer=tokenizer, eos=eos, policy=from_config(ref.config).to(device).eval(), prompts=prompts,
        # as eval.py's defaults: `eval.py --seed S` gives the same completions, hence the same numbers
        settings=dict(max_new_tokens=args.max_new_tokens, temperature=1.0, batch_size=64, seed=seed,
                      judge=RewardModel(os.path.join(args.out_dir, "judge"), device, batch_size=64),
                      heldout=heldout_sequences(data, args.heldout, tokenizer, ref.config.n_positions, eos)),
        reward_model=Reward([RewardModel(os.path.join(args.out_dir, "reward_model"), device, batch_size=64)]),
        n_reference=args.n_reference, samples=args.samples, table={model for _, model in table_models(args.setting)})


def _eval_task(task):
    """The rows of `task`: one for a model, on every eval prompt and (SPEC §2's table) on the reference's
    first prompts, with sample completions for the table's models; or one per N for best-of-N of the
    SFT model (the same random numbers: best-of-1 is the SFT model's row)."""
    name, recipe, extra = task
    e, start = _EVAL, time.perf_counter()
    if recipe[0] == "best_of":
        settings = {k: v for k, v in e["settings"].items() if k != "heldout"}
        rows = [dict(model=f"best-of-{r['best_of']}", **r)
                for r in best_of_n(e["ref"], e["reward_model"], e["prompts"], e["tokenizer"], e["eos"], recipe[1],
                                   **settings)]
        for r in rows:
            print(f"  {r['model']:<34} KL {r['kl']:7.3f}  reward {r['reward']:+.3f}  judge {r['judge']:.3f}", flush=True)
        print(f"  best-of-N: {time.perf_counter() - start:.0f}s", flush=True)
        return rows
    e["policy"].load_hf_state_dict(recipe_theta(recipe), where=name)
    in_table = name in e["table"]
    row = dict(model=name, **evaluate(e["policy"], e["ref"], e["reward_model"], e["prompts"], e["tokenizer"],
                                      e["eos"], samples=e["samples"] if in_table else 0, **e["settings"]), **extra)
    if in_table:
        reference = evaluate(e["policy"], e["ref"], e["reward_model"], e["prompts"][:e["n_reference"]],
                             e["tokenizer"], e["eos"], **{**e["settings"], "judge": None, "heldout": None})
        row["reference"] = {k: reference[k] for k in ("kl", "kl_se", "reward", "reward_se", "finished", "n")}
    print(f"  {name:<34} KL {row['kl']:7.3f}  reward {row['reward']:+.3f}  judge {row['judge']:.3f}  held-out NLL "
          f"{row['heldout_nll']:.3f}  length {row['length']:5.1f}  ({time.perf_counter() - start:.0f}s)", flush=True)
    return [row]


def evaluate_seed(args, seed):
    """Every task of seed_plan, in `workers` processes; returns {"rows": [...], "geometry": {...}}
    (the task vectors' cosines and norms, per iteration: merging.task_vector_stats)."""
    tasks, plan = seed_plan(args, seed)
    if args.workers <= 1:
        _eval_setup(args, seed, args.threads)
        rows = [row for t in tasks for row in _eval_task(t)]
    else:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.workers, ctx, initializer=_eval_setup,
                                                    initargs=(args, seed, args.threads)) as pool:
            rows = [row for rows in pool.map(_eval_task, tasks) for row in rows]
    geometry = {}
    for name, (theta_init, runs, merged) in plan.items():
        stats = merging.task_vector_stats(load_theta(theta_init), [load_theta(r) for r in runs], recipe_theta(merged))
        geometry[name] = {k: stats[k] for k in GEOMETRY}
    return dict(rows=rows, geometry=geometry)


GEOMETRY = ("cos", "cos_per_tensor_median", "tensors", "norm_1", "norm_2", "merge_norm_ratio")  # kept in results
