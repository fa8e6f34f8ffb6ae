"""
The job folder of a WARP run (--out_dir) and its crash safety: what the outer loop (nanowarp/warp.py,
through nanowarp/jobs/job.py) keeps on disk, and nothing of the algorithm. The folder holds, each a
checkpoint with the policy's tokenizer files:

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
a config.json is complete; its checksums.sha256 follows (nanowarp/checksums.py). Running the same
command again resumes the job: a finished iteration gives its θ_init back (iter_{i}/liti), finished
runs are kept, only the missing runs are trained (from their state.pt, if any), and the merge is
redone (it is a function of θ_init and the runs, which it always reads from disk). The result is the one of an uninterrupted job, bit for bit on a
CPU with the same --threads. The M runs of an iteration can train side by side (nanowarp/jobs/parallel.py).
Other faults: a full disk stops the job with hub.DiskFullError (nothing written is lost); SIGINT /
SIGTERM stop it at the end of a step (signals.Interrupted), saving the run's state with --save_every;
a second job on the same folder is refused (lock_out_dir); a finished checkpoint (or state.pt) that
cannot be read, or whose bytes differ from its checksums.sha256 (state.pt.sha256), is moved aside as
*.damaged and computed again (start_job, train_run).
"""

import contextlib
import dataclasses
import fcntl
import functools
import io
import json
import os
import shutil
import signal
import socket
import sys
import time

import torch

from nanowarp import checksums, hub, signals
from nanowarp.card import model_card
from nanowarp.config import RESUME_FREE, changed_flags
from nanowarp.jobs import parallel
from nanowarp.logger import Logger, append_jsonl
from nanowarp.models import cpu_weights, load_theta, save_policy
from nanowarp.reward import RewardError
from nanowarp.rl import rl_run


@functools.cache
def policy_folder(policy):
    return hub.resolve(policy)


def run_seed(cfg, iteration, run):
    """Distinct seeds for every run of every iteration (identical runs make SLERP degenerate)."""
    return cfg.seed + (iteration - 1) * cfg.runs + run


# ---- the folder -------------------------------------------------------------------------------

def job_folder(cfg, iteration, name):
    """OUT/iter_{i}/{name}: name is run_{m}, slerp or liti."""
    return os.path.join(cfg.out_dir, f"iter_{iteration}", name)


def is_complete(folder):
    return os.path.isfile(os.path.join(folder, "config.json"))  # written last


def load_theta_init(cfg, iteration):
    """θ_init of an iteration: θ_sft, or the LITI result of the previous iteration."""
    return load_theta(policy_folder(cfg.policy) if iteration == 1 else job_folder(cfg, iteration - 1, "liti"))


def job_card(cfg, name, what, metrics):
    """The model card of a job's checkpoint `name`: what it is, the base (SFT) policy, every flag."""
    return model_card(f"nanowarp WARP: {os.path.basename(os.path.abspath(cfg.out_dir))}/{name}", what, cfg.policy,
                      dataclasses.asdict(cfg), metrics)


def save_run(cfg, iteration, run, theta, rows, model_config):
    folder = job_folder(cfg, iteration, f"run_{run}")
    hub.write_text(os.path.join(folder, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    card = job_card(cfg, f"iter_{iteration}/run_{run}", f"Run {run + 1} of {cfg.runs} of WARP iteration {iteration}: "
                    f"{'REINFORCE' if cfg.rloo_k == 1 else f'RLOO (k = {cfg.rloo_k})'} for {cfg.steps} steps from "
                    f"that iteration's θ_init, seed {run_seed(cfg, iteration, run)}, its LoRA folded into dense "
                    f"weights.", rows[-1:])
    save_policy(folder, theta, model_config, policy_folder(cfg.policy), card)
    for name in ("state.pt", "state.pt.sha256"):  # the run is complete: its training state is no use
        if os.path.exists(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))


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


def kill_point(name):
    """A testing aid for crash safety: with NANOWARP_KILL_AT=name in the environment, the process
    kills itself here with a real SIGKILL (no cleanup). Names: iter_{i}/run_{m}/step_{t} (after step
    t is done), iter_{i}/run_{m}/saved (run saved, next one not started), iter_{i}/merge (SLERP
    saved, LITI not). With NANOWARP_KILL_ONCE=PATH too, only the first process to get there dies
    (it creates PATH first): the job that restarts with the same environment (torchrun
    --max_restarts, a Slurm requeue) goes on."""
    if os.environ.get("NANOWARP_KILL_AT") == name:
        if os.environ.get("NANOWARP_KILL_ONCE"):
            try:
                os.close(os.open(os.environ["NANOWARP_KILL_ONCE"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        os.kill(os.getpid(), signal.SIGKILL)


# ---- training states: state.pt and its checksum ------------------------------------------

def write_state(obj, path):
    """torch.save(obj, path), atomically, then its SHA-256 beside it in path.sha256 (sha256sum's format:
    torch.load checks no checksum of its own, and a changed byte of a tensor would load unnoticed)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    if os.path.exists(path + ".sha256"):
        os.remove(path + ".sha256")  # a crash before the new one is written: unverified, not wrong
    hub.write_bytes(path, buffer.getbuffer())
    hub.write_text(path + ".sha256", checksums.listing(os.path.dirname(path), [os.path.basename(path)]))


def read_state(path):
    """What write_state wrote to path (tensors on the CPU, no pickled code run), verified against
    path.sha256 when there is one; a file that cannot be read raises CheckpointError, naming it."""
    problem = checksums.problem(os.path.dirname(path), os.path.basename(path) + ".sha256")
    if problem:
        raise hub.CheckpointError(problem)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged zip or pickle raises whatever its reader meets first
        raise hub.CheckpointError(f"cannot read {path}: the file is corrupt or truncated ({type(e).__name__}: "
                                  f"{str(e)[:300]})") from None


# ---- one job per folder; starting, resuming, and what a crash left behind ---------------------

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
            if name.startswith(".tmp-") or (name in ("state.pt", "state.pt.sha256") and is_complete(folder)):
                os.remove(os.path.join(folder, name))
    set_damaged_aside(cfg, log)


def missing_runs(cfg, iteration):
    """The runs of an iteration still to train, or None when the whole iteration is done (its runs,
    SLERP and LITI on disk; a checkpoint set aside as damaged is computed again)."""
    runs = [m for m in range(cfg.runs) if not is_complete(job_folder(cfg, iteration, f"run_{m}"))]
    if not runs and all(is_complete(job_folder(cfg, iteration, name)) for name in ("slerp", "liti")):
        return None
    return runs


# ---- one run of the job -----------------------------------------------------------------------

STATE_KEYS = {"step", "lora", "anchor", "optimizer", "scheduler", "generator", "order", "queue", "torch_rng",
              "cuda_rng", "metrics"}  # run_state.training_state's, and the run's metric rows

def train_run(cfg, resources, iteration, run, theta_init, log=print, save=True):
    """One RL run of the job (rl.rl_run), saved to OUT/iter_{i}/run_{m} when `save`; returns (θ_m,
    its metric rows). A state.pt left there by --save_every is continued from."""
    i, m = iteration, run
    signals.check_stop()
    state_path = os.path.join(job_folder(cfg, i, f"run_{m}"), "state.pt")
    resume, rows = None, []
    if save and os.path.isfile(state_path):
        try:
            resume = read_state(state_path)
            if not STATE_KEYS <= resume.keys():
                raise hub.CheckpointError(f"{state_path} is not the training state of a run")
            rows = resume.pop("metrics")
            log(f"iter {i} run {m + 1}: resuming at step {resume['step']} from {state_path}")
        except Exception as e:  # anything that keeps it from being read (or a changed byte): the run starts over
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
        write_state({**state, "metrics": rows}, state_path)

    start, seed = time.perf_counter(), run_seed(cfg, i, m)
    try:
        theta_m = cpu_weights(rl_run(theta_init, m, seed, cfg, resources, log_step, resume,
                                     save_state if save else None, log_completions if save else None))
    except FloatingPointError as e:  # say which run; the finished ones (and state.pt) stay on disk
        raise FloatingPointError(f"iter_{i}/run_{m}: {e}") from None
    except RewardError as e:  # a reward function or server that failed: the same
        raise RewardError(f"iter_{i}/run_{m}: {e}") from None
    except signals.Interrupted as e:  # SIGINT / SIGTERM, at the end of step e.step
        saved = f"its training state is in {state_path}" if save and cfg.save_every else \
            "it will start over (--save_every N would have saved its state)"
        log(f"iter {i} run {m + 1}: stopped after step {e.step}/{cfg.steps}; {saved}")
        raise
    finally:
        logger.close()
    if save:
        save_run(cfg, i, m, theta_m, rows, resources.model_config)
        kill_point(f"iter_{i}/run_{m}/saved")
    log(f"iter {i} run {m + 1}: done in {time.perf_counter() - start:.1f}s (seed {seed})")
    return theta_m, rows
