"""
The job at work, as the outer loop (nanowarp/warp.py) drives it: `open_job` starts or resumes the
job in its folder (nanowarp/jobs/folder.py) and locks it, loads what the runs share, and sets up the
processes that train them: this one, --workers worker processes, or torchrun's ranks
(nanowarp/jobs/parallel.py), on one machine or several. The `Job` it gives warp() trains the runs of an
iteration, saves the merges, and hands θ_init from the rank that holds the folder to every rank.
"""

import contextlib
import dataclasses
import os
import socket

import torch

from nanowarp.jobs import parallel
from nanowarp.config import RESUME_FREE, changed_flags, resolve_device
from nanowarp.jobs.folder import (job_card, job_folder, kill_point, last_rows, load_theta_init, lock_out_dir, missing_runs,
                          policy_folder, save_run, start_job, train_run, write_metrics)
from nanowarp.logger import Logger
from nanowarp.models import load_config, load_theta, save_policy
from nanowarp.rl import load_resources


class Job:
    """A WARP job at work in its folder, as warp() uses it (open_job makes one). Under torchrun every
    rank holds one; the root (`leader`, see choose_root) alone reads and writes the folder and logs."""

    def __init__(self, cfg, group, resources, pool, log):
        self.cfg, self.group, self.resources, self.pool, self.log = cfg, group, resources, pool, log
        self.leader = group.leader
        self.model_config = load_config(policy_folder(cfg.policy))

    def theta_sft(self):
        """The SFT policy's weights (--policy), where iteration 1 starts: the root's, on every rank."""
        return self.group.broadcast(load_theta_init(self.cfg, 1))

    def missing_runs(self, iteration):
        """missing_runs(), as the root finds them on disk, on every rank."""
        return self.group.on_leader(lambda: missing_runs(self.cfg, iteration))

    def train_runs(self, iteration, runs, theta_init):
        """Train and save these runs of an iteration: in the worker processes, spread over the torchrun
        ranks (rank r takes runs r, r + K, ...), or one after the other here. Returns, on the root, all
        M runs θ_m as saved (the merge always reads them from disk); None on the other ranks."""
        cfg, group = self.cfg, self.group
        if self.pool is not None:
            self.pool.train(iteration, runs, on_done=lambda m: write_metrics(cfg))
        else:
            for start in range(0, len(runs), group.size):  # one run per rank at a time
                self._train_on_ranks(iteration, runs[start:start + group.size], theta_init)
        if group.leader:
            return [load_theta(job_folder(cfg, iteration, f"run_{m}")) for m in range(cfg.runs)]
        return None

    def _train_on_ranks(self, iteration, batch, theta_init):
        """Rank r trains batch[r]; the root saves them all."""
        cfg, group, theta_m, rows = self.cfg, self.group, None, None
        if group.rank < len(batch):
            theta_m, rows = train_run(cfg, self.resources, iteration, batch[group.rank], theta_init, self.log,
                                      save=group.leader)
        for m, theta_m, rows in group.gather_runs(batch, theta_m, rows, like=theta_init):  # to the root
            save_run(cfg, iteration, m, theta_m, rows, self.model_config)
            if cfg.report_to != "none":  # another rank's run: its metrics, logged now
                logger = Logger(cfg.report_to, cfg.out_dir, f"iter_{iteration}/run_{m}", dataclasses.asdict(cfg))
                for row in rows:
                    logger.scalars(row, row["step"])
                logger.close()
        if group.leader:
            write_metrics(cfg)

    def save_slerp(self, iteration, theta):
        """OUT/iter_{i}/slerp, with its model card."""
        cfg = self.cfg
        card = job_card(cfg, f"iter_{iteration}/slerp", f"The {cfg.merge.upper()} of the {cfg.runs} runs of WARP "
                        f"iteration {iteration} around its θ_init (λ = 1/{cfg.runs}, per tensor).",
                        last_rows(cfg, iteration))
        save_policy(job_folder(cfg, iteration, "slerp"), theta, self.model_config, policy_folder(cfg.policy), card)
        kill_point(f"iter_{iteration}/merge")

    def save_liti(self, iteration, theta):
        """OUT/iter_{i}/liti, with its model card: θ_init of the next iteration."""
        cfg, folder = self.cfg, job_folder(self.cfg, iteration, "liti")
        card = job_card(cfg, f"iter_{iteration}/liti", f"θ_init after WARP iteration {iteration} (the policy a job "
                        f"with --iterations {iteration} returns): LITI (1 − η) θ_init + η θ_slerp, η = {cfg.liti_rate}.",
                        last_rows(cfg, iteration))
        save_policy(folder, theta, self.model_config, policy_folder(cfg.policy), card)
        self.log(f"iter {iteration}: merged {cfg.runs} run{'s' * (cfg.runs > 1)} ({cfg.merge}), "
                 f"LITI eta={cfg.liti_rate} -> {folder}")

    def load_liti(self, iteration):
        """θ_init after an iteration done before a restart (the root)."""
        folder = job_folder(self.cfg, iteration, "liti")
        self.log(f"iter {iteration}: done earlier, theta_init <- {folder}")
        return load_theta(folder)

    def broadcast(self, theta):
        """The root's θ on every rank."""
        return self.group.broadcast(theta)


# Flags that may differ between the ranks of one job: those a resume may change (RESUME_FREE), but
# three that the ranks must share to work together: --iterations (the same loop), --workers and
# --device (the same processes and backend).
RANK_FREE = tuple(f for f in RESUME_FREE if f not in ("iterations", "workers", "device"))


def choose_root(cfg, group):
    """Under torchrun: check that every rank was started with the job's flags, and choose the root,
    the rank that keeps the job folder: the first whose --out_dir holds a job to resume (job.json),
    else rank 0. So a job resumes on the machine that holds its folder, whatever rank torchrun's
    rendezvous gives that machine, and the other machines need no --out_dir."""
    if group.size == 1:
        return
    ranks = group.gather_objects((socket.gethostname(), dataclasses.asdict(cfg),
                                  os.path.isfile(os.path.join(cfg.out_dir, "job.json"))))
    group.root = next((r for r, (_, _, has_job) in enumerate(ranks) if has_job), 0)
    for r, (host, settings, _) in enumerate(ranks):
        differing = changed_flags(ranks[group.root][1], settings, RANK_FREE)
        if differing:  # the same verdict on every rank: they all stop
            raise ValueError(f"rank {r} (on {host}) was started with other flags than rank {group.root} (on "
                             f"{ranks[group.root][0]}): {', '.join(differing)}. Start every rank with the same flags")


@contextlib.contextmanager
def open_job(cfg, resources=None, log=print):
    """The Job in cfg.out_dir, started or resumed (start_job), its folder locked while inside this block
    (lock_out_dir), and the processes that train its runs started: --workers, torchrun's ranks, or
    this process alone. `resources` (rl.Resources), when given, spare loading them here."""
    group = parallel.Group.from_env(resolve_device(cfg.device))
    choose_root(cfg, group)
    log = log if group.leader else (lambda *a: None)  # only the root logs and writes files
    if group.size > 1:
        log(f"rank {group.rank} of {group.size} on {socket.gethostname()} keeps the job folder {cfg.out_dir}")
        if parallel.restart_warning():
            log(parallel.restart_warning())
    devices = parallel.worker_devices(cfg, group.device, group)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    lock, pool = contextlib.ExitStack(), None
    group.on_leader(lambda: lock.enter_context(lock_out_dir(cfg.out_dir)))  # a second job stops here
    try:
        # a wrong path or model fails here, on any rank, before anything is written (the workers load their own)
        resources = resources or group.everywhere(
            lambda: load_resources(cfg, torch.device("cpu") if devices else group.device))
        group.on_leader(lambda: start_job(cfg, log))
        if devices:
            threads = cfg.threads or max(1, torch.get_num_threads() // len(devices))
            log(f"{len(devices)} workers ({', '.join(map(str, devices))}), {threads} CPU threads each")
            pool = parallel.WorkerPool(cfg, devices, threads, load_resources, train_worker_run)
            resources = None
        yield Job(cfg, group, resources, pool, log)
    finally:
        if pool is not None:
            pool.close()
        lock.close()  # releases the folder
    group.close()


def train_worker_run(cfg, resources, iteration, run, log):
    """A run as a worker process trains it (parallel.WorkerPool): from its iteration's θ_init, read from disk."""
    train_run(cfg, resources, iteration, run, load_theta_init(cfg, iteration), log)
