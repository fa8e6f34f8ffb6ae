"""
WARP, the outer loop (Algorithm 1 of Ramé et al. 2024, arXiv 2406.16768):

    θ_init ← θ_sft
    for i in 1..I:
        for m in 1..M:   θ_m ← RL run from θ_init (own seed, own EMA anchor)
        θ_slerp ← SLERP(θ_init, {θ_m}, λ = 1/M)
        θ_init ← (1 − η) θ_init + η θ_slerp          (LITI)

Everything here is dense weights in the Hugging Face layout: each run's LoRA is folded into its
effective weights before merging, and the next iteration puts a fresh LoRA on the merged θ_init.

The job folder (--out_dir) holds, each a checkpoint with the policy's tokenizer files:

    job.json                 the job's settings (the Config), written when it starts
    iter_{i}/run_{m}/        run m of iteration i, with its metrics.jsonl (and state.pt while it
                             trains with --save_every)
    iter_{i}/slerp/          the merge of the runs
    iter_{i}/liti/           the next θ_init
    metrics.jsonl            every step of every finished run, rebuilt as runs finish
    completions.jsonl        with --log_completions: a few completions every N steps, appended live
    tensorboard/             with --report_to tensorboard: iter_{i}/run_{m}/ event files
    job.lock                 locked by the job that works here (one job per folder)

Every checkpoint folder also holds a model card, README.md (nanowarp/card.py).

Crash safety. Every file is written atomically and a checkpoint's config.json last, so a folder with
a config.json is complete. Running the same command again resumes the job: a finished iteration
gives its θ_init back (iter_{i}/liti), finished runs are kept, only the missing runs are trained
(from their state.pt, if any), and the merge is redone (it is a function of θ_init and the runs,
which it always reads from disk). The result is the one of an uninterrupted job, bit for bit on a
CPU with the same --threads. The M runs of an iteration can train side by side (nanowarp/parallel.py).
Other faults: a full disk stops the job with hub.DiskFullError (nothing written is lost); SIGINT /
SIGTERM stop it at the end of a step (parallel.Interrupted), saving the run's state with --save_every;
a second job on the same folder is refused (lock_out_dir); a finished checkpoint (or state.pt) that
cannot be read is moved aside as *.damaged and computed again (start_job, train_run).
"""

import contextlib
import dataclasses
import fcntl
import functools
import json
import os
import shutil
import signal
import socket
import sys
import time

import torch

from nanowarp import hub, merging, parallel
from nanowarp.card import model_card
from nanowarp.config import RESUME_FREE, changed_flags
from nanowarp.data import load_prompt_file, load_prompts
from nanowarp.logger import Logger, append_jsonl, check_report_to
from nanowarp.gpt2 import GPT2, GPT2Config
from nanowarp.reward import RewardModel
from nanowarp.rl import Resources, rl_run
from nanowarp.tokenizer import load_tokenizer


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_seed(cfg, iteration, run):
    """Distinct seeds for every run of every iteration (identical runs make SLERP degenerate)."""
    return cfg.seed + (iteration - 1) * cfg.runs + run


def validate(cfg):
    """Reject impossible hyperparameters with a message that names the flag."""
    checks = [
        (cfg.iterations >= 1, f"--iterations must be >= 1, got {cfg.iterations}"),
        (cfg.runs >= 1, f"--runs (M) must be >= 1, got {cfg.runs}"),
        (cfg.steps >= 1, f"--steps must be >= 1, got {cfg.steps}"),
        (0 < cfg.ema_rate <= 1, f"--ema_rate (mu) must be in (0, 1], got {cfg.ema_rate}"),
        (0 <= cfg.liti_rate <= 1, f"--liti_rate (eta) must be in [0, 1], got {cfg.liti_rate}"),
        (cfg.kl_coef >= 0, f"--kl_coef must be >= 0, got {cfg.kl_coef}"),
        (cfg.rloo_k >= 1, f"--rloo_k must be >= 1, got {cfg.rloo_k}"),
        (cfg.batch_size >= cfg.rloo_k and cfg.batch_size % cfg.rloo_k == 0,
         f"--batch_size ({cfg.batch_size}) must be a positive multiple of --rloo_k ({cfg.rloo_k})"),
        (cfg.max_new_tokens >= 1, f"--max_new_tokens must be >= 1, got {cfg.max_new_tokens}"),
        (cfg.temperature > 0, f"--temperature must be > 0, got {cfg.temperature}"),
        (cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}"),
        (cfg.warmup >= 0, f"--warmup must be >= 0, got {cfg.warmup}"),
        (cfg.lora_rank >= 1, f"--lora_rank must be >= 1, got {cfg.lora_rank}"),
        (cfg.workers >= 0, f"--workers must be >= 0 (0 = one per CUDA device), got {cfg.workers}"),
        (cfg.threads >= 0, f"--threads must be >= 0 (0 = automatic), got {cfg.threads}"),
        (cfg.save_every >= 0, f"--save_every must be >= 0 (0 = off), got {cfg.save_every}"),
        (cfg.log_completions >= 0, f"--log_completions must be >= 0 (0 = off), got {cfg.log_completions}"),
        (cfg.test_limit >= 0, f"--test_limit must be >= 0 (0 = all), got {cfg.test_limit}"),
        (cfg.micro_batch_size >= 0 and cfg.micro_batch_size % cfg.rloo_k == 0,
         f"--micro_batch_size ({cfg.micro_batch_size}) must be 0 (the whole batch) or a positive multiple of "
         f"--rloo_k ({cfg.rloo_k}), so that each prompt's {cfg.rloo_k} completions stay in one micro-batch"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    check_report_to(cfg.report_to)  # a missing package fails now, not after the first run


def load_resources(cfg, device=None):
    device = device or resolve_device(cfg.device)
    folder = policy_folder(cfg.policy)
    gpt2_config = GPT2Config.from_hf(hub.load_config(folder), where=folder)
    tokenizer = load_tokenizer(folder)
    eos_id = gpt2_config.eos_token_id
    prompts = load_prompt_file(cfg.prompts, tokenizer) if cfg.prompts else load_prompts(cfg.data, "train")
    reward_model = RewardModel(cfg.reward_model, device, kind=cfg.reward_kind, no_eos_penalty=cfg.no_eos_penalty,
                               label=cfg.reward_label, dtype=getattr(torch, cfg.dtype))
    return Resources(gpt2_config, tokenizer, reward_model, prompts, eos_id, device)


@functools.cache
def policy_folder(policy):
    return hub.resolve(policy)


# ---- the job folder ---------------------------------------------------------------------------

def job_folder(cfg, iteration, name):
    """OUT/iter_{i}/{name}: name is run_{m}, slerp or liti."""
    return os.path.join(cfg.out_dir, f"iter_{iteration}", name)


def is_complete(folder):
    return os.path.isfile(os.path.join(folder, "config.json"))  # written last


def load_theta(folder):
    """Dense weights of a checkpoint, in the Hugging Face layout, in one canonical form (key order,
    contiguous CPU tensors), whether they come from a file or from training."""
    return canonical(GPT2.from_pretrained(folder).hf_state_dict())


def canonical(theta):
    return {k: v.detach().cpu().contiguous() for k, v in theta.items()}


def load_theta_init(cfg, iteration):
    """θ_init of an iteration: θ_sft, or the LITI result of the previous iteration."""
    return load_theta(policy_folder(cfg.policy) if iteration == 1 else job_folder(cfg, iteration - 1, "liti"))


def save_policy(folder, theta, gpt2_config, tokenizer_folder, card=None):
    """A complete Hugging Face checkpoint: weights, config, the policy's tokenizer files, and the
    model card `card` (the text of README.md), if given."""
    if card is not None:
        hub.write_text(os.path.join(folder, "README.md"), card)
    for name in hub.TOKENIZER_FILES:
        src = os.path.join(tokenizer_folder, name)
        if os.path.isfile(src):
            hub.atomic_write(os.path.join(folder, name), lambda tmp: shutil.copyfile(src, tmp), os.path.getsize(src))
    hub.save_checkpoint(folder, gpt2_config.to_hf(), theta)  # config.json last: the folder is complete


def save_run(cfg, iteration, run, theta, rows, gpt2_config):
    folder = job_folder(cfg, iteration, f"run_{run}")
    hub.write_text(os.path.join(folder, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    card = job_card(cfg, f"iter_{iteration}/run_{run}", f"Run {run + 1} of {cfg.runs} of WARP iteration {iteration}: "
                    f"{'REINFORCE' if cfg.rloo_k == 1 else f'RLOO (k = {cfg.rloo_k})'} for {cfg.steps} steps from "
                    f"that iteration's θ_init, seed {run_seed(cfg, iteration, run)}, its LoRA folded into dense "
                    f"weights.", rows[-1:])
    save_policy(folder, theta, gpt2_config, policy_folder(cfg.policy), card)
    if os.path.exists(os.path.join(folder, "state.pt")):
        os.remove(os.path.join(folder, "state.pt"))  # the run is complete: its training state is no use


def job_card(cfg, name, what, metrics):
    """The model card of a job's checkpoint `name`: what it is, the base (SFT) policy, every flag."""
    return model_card(f"nanowarp WARP: {os.path.basename(os.path.abspath(cfg.out_dir))}/{name}", what, cfg.policy,
                      dataclasses.asdict(cfg), metrics)


def last_rows(cfg, iteration):
    """The last metrics row of every run of an iteration (for the merges' model cards)."""
    rows = []
    for m in range(cfg.runs):
        with open(os.path.join(job_folder(cfg, iteration, f"run_{m}"), "metrics.jsonl")) as f:
            rows += [json.loads(line) for line in f][-1:]
    return rows


def write_metrics(cfg):
    """OUT/metrics.jsonl: the rows of every finished run, in order. Rebuilt from the runs' own
    files, so that a run killed half-way, and trained again, leaves no duplicate rows."""
    lines = []
    for i in range(1, cfg.iterations + 1):
        for m in range(cfg.runs):
            folder = job_folder(cfg, i, f"run_{m}")
            if is_complete(folder):
                with open(os.path.join(folder, "metrics.jsonl")) as f:
                    lines.append(f.read())
    hub.write_text(os.path.join(cfg.out_dir, "metrics.jsonl"), "".join(lines))


@contextlib.contextmanager
def lock_out_dir(out_dir):
    """One job per folder: an exclusive lock on OUT/job.lock, held inside this block, and dropped by
    the operating system when the process ends, even by SIGKILL. Another process holding it is
    refused at once, by its pid. A folder this made and nothing else wrote to is removed again."""
    created = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "job.lock")
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "a process that has not written its pid yet"
        f.close()
        raise ValueError(f"{out_dir} is in use by another job ({holder}), which holds {path}: wait for it to "
                         f"finish, stop it (Ctrl-C or kill; it resumes later), or choose another --out_dir") from None
    except OSError as e:  # a file system without locks (some network ones): go on, unguarded
        print(f"warning: cannot lock {path} ({e.strerror}): nothing keeps a second job out of {out_dir}",
              file=sys.stderr)
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    try:
        yield
    finally:
        if created and os.listdir(out_dir) == ["job.lock"]:  # stopped before writing anything: no trace
            os.remove(path)
            os.rmdir(out_dir)
        f.close()


def read_job_file(path, out_dir):
    """The settings in job.json, or a ValueError naming the damaged file and the ways out."""
    try:
        with open(path, encoding="utf-8") as f:
            settings = json.load(f)
        if not isinstance(settings, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is damaged ({e}): it holds the settings of the job in {out_dir}. Restore it "
                         f"from a copy, add --fresh to delete the job's results and start over, or choose "
                         f"another --out_dir") from None
    return settings


def damage(folder, steps=None):
    """Why a complete checkpoint folder of the job cannot be used, or None. With `steps` (a run),
    its metrics.jsonl must hold steps 1..steps too."""
    try:
        hub.check_readable(folder)
        if steps is not None:
            with open(os.path.join(folder, "metrics.jsonl"), encoding="utf-8") as f:
                if [json.loads(line)["step"] for line in f] != list(range(1, steps + 1)):
                    raise ValueError(f"{os.path.join(folder, 'metrics.jsonl')} does not hold steps 1..{steps}")
    except (hub.CheckpointError, OSError, ValueError, KeyError, TypeError) as e:
        return str(e)
    return None


def move_aside(path):
    """Rename path to path.damaged (or .damaged.2, ...); returns the new name."""
    target, n = path + ".damaged", 1
    while os.path.exists(target):
        n += 1
        target = f"{path}.damaged.{n}"
    os.rename(path, target)
    return target


def set_damaged_aside(cfg, log):
    """Move every finished run, SLERP or LITI checkpoint of the job that cannot be read (a disk
    error, a file cut short or changed by hand) to *.damaged, so that it is computed again."""
    found = False
    for i in range(1, cfg.iterations + 1):
        for name in [f"run_{m}" for m in range(cfg.runs)] + ["slerp", "liti"]:
            folder = job_folder(cfg, i, name)
            problem = is_complete(folder) and damage(folder, cfg.steps if name.startswith("run_") else None)
            if problem:
                log(f"damaged: {problem}; moved {folder} aside to {move_aside(folder)}: it will be computed again")
                found = True
    if found or os.path.exists(os.path.join(cfg.out_dir, "metrics.jsonl")):
        write_metrics(cfg)  # without the rows of a run set aside; and a damaged copy is rebuilt


def start_job(cfg, log=print):
    """Start a new job in cfg.out_dir, or check that the job there has the same settings and resume it.
    Flags in config.RESUME_FREE may differ; any other difference is refused, unless --fresh."""
    path = os.path.join(cfg.out_dir, "job.json")
    results = [n for n in os.listdir(cfg.out_dir) if n.startswith("iter_")] if os.path.isdir(cfg.out_dir) else []
    settings = dataclasses.asdict(cfg)
    if cfg.fresh and (results or os.path.exists(path)):
        for name in results:
            shutil.rmtree(os.path.join(cfg.out_dir, name))
        for name in ("job.json", "metrics.jsonl", "completions.jsonl"):
            if os.path.exists(os.path.join(cfg.out_dir, name)):
                os.remove(os.path.join(cfg.out_dir, name))
        shutil.rmtree(os.path.join(cfg.out_dir, "tensorboard"), ignore_errors=True)
        log(f"--fresh: deleted the earlier job's results in {cfg.out_dir}")
    elif os.path.exists(path):
        earlier = read_job_file(path, cfg.out_dir)
        # a flag newer than the job's job.json: the job ran with what its default does
        earlier = {**{f.name: f.default for f in dataclasses.fields(cfg) if f.name not in earlier}, **earlier}
        differing = changed_flags(earlier, settings, RESUME_FREE)
        if differing:
            raise ValueError(f"{cfg.out_dir} holds a job with other settings: {', '.join(differing)}. Run it "
                             "with its own flags to resume it, add --fresh to delete its results and start over, "
                             "or choose another --out_dir")
        log(f"resuming the job in {cfg.out_dir}")
    elif results:
        raise ValueError(f"{cfg.out_dir} holds WARP results but no job.json, so they cannot be resumed: "
                         f"add --fresh to delete them and start over, or choose another --out_dir")
    hub.write_json(path, settings, sort_keys=True)
    for folder, _, files in os.walk(cfg.out_dir):  # what a kill -9 may have left behind
        for name in files:
            if name.startswith(".tmp-") or (name == "state.pt" and is_complete(folder)):
                os.remove(os.path.join(folder, name))
    set_damaged_aside(cfg, log)


def missing_runs(cfg, iteration):
    """The runs of an iteration still to train, or None when the whole iteration is done (its runs,
    SLERP and LITI on disk; a checkpoint set aside as damaged is computed again)."""
    runs = [m for m in range(cfg.runs) if not is_complete(job_folder(cfg, iteration, f"run_{m}"))]
    if not runs and all(is_complete(job_folder(cfg, iteration, name)) for name in ("slerp", "liti")):
        return None
    return runs


def kill_point(name):
    """A testing aid for crash safety: with NANOWARP_KILL_AT=name in the environment, the process
    kills itself here with a real SIGKILL (no cleanup). Names: iter_{i}/run_{m}/step_{t} (after step
    t is done), iter_{i}/run_{m}/saved (run saved, next one not started), iter_{i}/merge (SLERP
    saved, LITI not)."""
    if os.environ.get("NANOWARP_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


# ---- the runs ---------------------------------------------------------------------------------

def train_run(cfg, res, iteration, run, theta_init, log=print, save=True):
    """One RL run of the job (Algorithm 1, lines 4–10), saved to OUT/iter_{i}/run_{m} when `save`;
    returns (θ_m, its metric rows). A state.pt left there by --save_every is continued from."""
    i, m = iteration, run
    parallel.check_stop()
    state_path = os.path.join(job_folder(cfg, i, f"run_{m}"), "state.pt")
    resume, rows = None, []
    if save and os.path.isfile(state_path):
        try:
            resume = torch.load(state_path, map_location="cpu", weights_only=True)
            rows = resume.pop("metrics")
            log(f"iter {i} run {m + 1}: resuming at step {resume['step']} from {state_path}")
        except Exception as e:  # anything that keeps it from being read: the run starts over
            resume, rows = None, []
            log(f"iter {i} run {m + 1}: damaged: cannot read {state_path} ({type(e).__name__}: {e}); "
                f"moved aside to {move_aside(state_path)}: the run starts over")

    logger = Logger(cfg.report_to if save else "none", cfg.out_dir, f"iter_{i}/run_{m}", dataclasses.asdict(cfg))

    def log_completions(step, samples):
        samples = [dict(iteration=i, run=m, step=step, **r) for r in samples]
        append_jsonl(os.path.join(cfg.out_dir, "completions.jsonl"), samples)
        logger.completions(samples, step)

    def log_step(row):
        row = dict(iteration=i, run=m, **row)
        rows.append(row)
        logger.scalars(row, row["step"])
        if row["step"] % cfg.log_every == 0 or row["step"] == cfg.steps:
            log(f"iter {i}/{cfg.iterations} run {m + 1}/{cfg.runs} step {row['step']:4d}/{cfg.steps} | "
                f"reward {row['reward']:+.3f} kl {row['kl']:.3f} r_beta {row['r_beta']:+.3f} "
                f"len {row['length']:5.1f} fin {row['finished']:.2f} lr {row['lr']:.2e} "
                f"|g| {row['grad_norm']:.3f} {row['tokens_per_s']:.0f} tok/s")
        parallel.exit_if_orphaned()
        kill_point(f"iter_{i}/run_{m}/step_{row['step']}")

    def save_state(state):
        hub.torch_save({**state, "metrics": rows}, state_path)

    start, seed = time.perf_counter(), run_seed(cfg, i, m)
    try:
        theta_m = canonical(rl_run(theta_init, m, seed, cfg, res, log_step, resume, save_state if save else None,
                                   log_completions if save else None))
    except FloatingPointError as e:  # say which run; the finished ones (and state.pt) stay on disk
        raise FloatingPointError(f"iter_{i}/run_{m}: {e}") from None
    except parallel.Interrupted as e:  # SIGINT / SIGTERM, at the end of step e.step
        saved = f"its training state is in {state_path}" if save and cfg.save_every else \
            "it will start over (--save_every N would have saved its state)"
        log(f"iter {i} run {m + 1}: stopped after step {e.step}/{cfg.steps}; {saved}")
        raise
    finally:
        logger.close()
    if save:
        save_run(cfg, i, m, theta_m, rows, res.gpt2_config)
        kill_point(f"iter_{i}/run_{m}/saved")
    log(f"iter {i} run {m + 1}: done in {time.perf_counter() - start:.1f}s (seed {seed})")
    return theta_m, rows


def train_runs(cfg, iteration, runs, theta_init, res, pool, group, log):
    """Train and save the runs of an iteration that are not on disk yet: in the worker processes,
    spread over the torchrun ranks (rank r takes runs r, r + K, ...), or one after the other here."""
    if pool is not None:
        pool.train(iteration, runs, on_done=lambda m: write_metrics(cfg))
        return
    for start in range(0, len(runs), group.size):  # one run per rank at a time
        batch, theta_m, rows = runs[start:start + group.size], None, None
        if group.rank < len(batch):
            theta_m, rows = train_run(cfg, res, iteration, batch[group.rank], theta_init, log, save=group.leader)
        for m, theta_m, rows in group.gather_runs(batch, theta_m, rows, like=theta_init):  # to rank 0
            save_run(cfg, iteration, m, theta_m, rows, res.gpt2_config)
            if m != batch[0] and cfg.report_to != "none":  # another rank's run: its metrics, logged now
                logger = Logger(cfg.report_to, cfg.out_dir, f"iter_{iteration}/run_{m}", dataclasses.asdict(cfg))
                for row in rows:
                    logger.scalars(row, row["step"])
                logger.close()
        if group.leader:
            write_metrics(cfg)


def worker_devices(cfg, device, group):
    """The device of each worker process; at most one worker means training in this process."""
    if group.size > 1:
        if cfg.workers > 1:
            raise ValueError("--workers and torchrun both start processes: use one or the other")
        return []
    if device.type == "cuda" and device.index is None:  # "cuda" or "auto": every visible GPU
        devices = [torch.device("cuda", k) for k in range(torch.cuda.device_count())]
    else:
        devices = [device]
    n = min(cfg.workers or len(devices), cfg.runs)  # more workers than runs would idle
    return [devices[w % len(devices)] for w in range(n)] if n > 1 else []


# ---- Algorithm 1 ------------------------------------------------------------------------------

def warp(cfg, res=None, log=print):
    """Run Algorithm 1 in cfg.out_dir, resuming the job already there; returns the final θ_init
    (dense, Hugging Face layout). Under torchrun, every rank calls this."""
    validate(cfg)
    group = parallel.Group.from_env(resolve_device(cfg.device))
    log = log if group.leader else (lambda *a: None)  # only rank 0 logs and writes files
    devices = worker_devices(cfg, group.device, group)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    lock, pool = contextlib.ExitStack(), None
    group.share(lambda: lock.enter_context(lock_out_dir(cfg.out_dir)))  # rank 0 holds it; a second job stops here
    try:
        # a wrong path or model fails here, before anything is written (the workers load their own)
        res = res or load_resources(cfg, torch.device("cpu") if devices else group.device)
        group.share(lambda: start_job(cfg, log))
        if devices:
            threads = cfg.threads or max(1, torch.get_num_threads() // len(devices))
            log(f"{len(devices)} workers ({', '.join(map(str, devices))}), {threads} CPU threads each")
            pool, res = parallel.WorkerPool(cfg, devices, threads), None
        gpt2_config = GPT2Config.from_hf(hub.load_config(policy_folder(cfg.policy)))
        merge = merging.slerp if cfg.merge == "slerp" else merging.lerp
        theta_init = load_theta_init(cfg, 1)  # θ_sft

        for i in range(1, cfg.iterations + 1):
            liti_folder = job_folder(cfg, i, "liti")
            missing = group.share(lambda: missing_runs(cfg, i))  # rank 0 looks at what is on disk
            if missing is None:  # iteration i was done before a restart
                theta_init = load_theta(liti_folder) if group.leader else theta_init
                log(f"iter {i}: done earlier, theta_init <- {liti_folder}")
            else:
                # for m in 1..M: θ_m ← RL run from θ_init (the runs not on disk yet, side by side if possible)
                train_runs(cfg, i, missing, theta_init, res, pool, group, log)
                if group.leader:
                    thetas = [load_theta(job_folder(cfg, i, f"run_{m}")) for m in range(cfg.runs)]
                    theta_merged = merge(theta_init, thetas)  # SLERP(θ_init, {θ_m}, λ = 1/M), per tensor
                    runs_last = last_rows(cfg, i)
                    save_policy(job_folder(cfg, i, "slerp"), theta_merged, gpt2_config, policy_folder(cfg.policy),
                                job_card(cfg, f"iter_{i}/slerp", f"The {cfg.merge.upper()} of the {cfg.runs} runs of WARP "
                                         f"iteration {i} around its θ_init (λ = 1/{cfg.runs}, per tensor).", runs_last))
                    kill_point(f"iter_{i}/merge")
                    theta_init = merging.liti(theta_init, theta_merged, cfg.liti_rate)  # (1−η) θ_init + η θ_slerp
                    save_policy(liti_folder, theta_init, gpt2_config, policy_folder(cfg.policy),
                                job_card(cfg, f"iter_{i}/liti", f"θ_init after WARP iteration {i} (the policy a job with "
                                         f"--iterations {i} returns): LITI (1 − η) θ_init + η θ_slerp, η = "
                                         f"{cfg.liti_rate}.", runs_last))
                    log(f"iter {i}: merged {cfg.runs} run{'s' * (cfg.runs > 1)} ({cfg.merge}), LITI eta={cfg.liti_rate} -> {liti_folder}")
            theta_init = group.broadcast(theta_init)  # the new θ_init on every rank
    finally:
        if pool is not None:
            pool.close()
        lock.close()  # releases the folder
    group.close()
    return theta_init
