"""
The job at work, as the outer loop (nanowarp/warp.py) drives it: `open_job` starts or resumes the
job in its folder (nanowarp/job.py) and locks it, loads what the runs share, and sets up the
processes that train them: this one, --workers worker processes, or torchrun's ranks
(nanowarp/parallel.py). The `Job` it gives warp() trains the runs of an iteration, saves the
merges, and hands θ_init from rank 0 to every rank.
"""

import contextlib
import dataclasses

import torch

from nanowarp import parallel
from nanowarp.config import resolve_device
from nanowarp.job import (job_card, job_folder, kill_point, last_rows, load_theta_init, lock_out_dir, missing_runs,
                          policy_folder, save_run, start_job, train_run, write_metrics)
from nanowarp.logger import Logger
from nanowarp.models import load_config, load_theta, save_policy
from nanowarp.rl import load_resources


class Job:
    """A WARP job at work in its folder, as warp() uses it (open_job makes one). Under torchrun every
    rank holds one; rank 0 (`leader`) alone reads and writes the folder and logs."""

    def __init__(self, cfg, group, resources, pool, log):
        self.cfg, self.group, self.resources, self.pool, self.log = cfg, group, resources, pool, log
        self.leader = group.leader
        self.model_config = load_config(policy_folder(cfg.policy))

    def theta_sft(self):
        """The SFT policy's weights (--policy), where iteration 1 starts."""
        return load_theta_init(self.cfg, 1)

    def missing_runs(self, iteration):
        """missing_runs(), as rank 0 finds them on disk, on every rank."""
        return self.group.on_leader(lambda: missing_runs(self.cfg, iteration))

    def train_runs(self, iteration, runs, theta_init):
        """Train and save these runs of an iteration: in the worker processes, spread over the torchrun
        ranks (rank r takes runs r, r + K, ...), or one after the other here. Returns, on rank 0, all
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
        """Rank r trains batch[r]; rank 0 saves them all."""
        cfg, group, theta_m, rows = self.cfg, self.group, None, None
        if group.rank < len(batch):
            theta_m, rows = train_run(cfg, self.resources, iteration, batch[group.rank], theta_init, self.log,
                                      save=group.leader)
        for m, theta_m, rows in group.gather_runs(batch, theta_m, rows, like=theta_init):  # to rank 0
            save_run(cfg, iteration, m, theta_m, rows, self.model_config)
            if m != batch[0] and cfg.report_to != "none":  # another rank's run: its metrics, logged now
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
        """θ_init after an iteration done before a restart (rank 0)."""
        folder = job_folder(self.cfg, iteration, "liti")
        self.log(f"iter {iteration}: done earlier, theta_init <- {folder}")
        return load_theta(folder)

    def broadcast(self, theta):
        """Rank 0's θ on every rank."""
        return self.group.broadcast(theta)


@contextlib.contextmanager
def open_job(cfg, resources=None, log=print):
    """The Job in cfg.out_dir, started or resumed (start_job), its folder locked while inside this block
    (lock_out_dir), and the processes that train its runs started: --workers, torchrun's ranks, or
    this process alone. `resources` (rl.Resources), when given, spare loading them here."""
    group = parallel.Group.from_env(resolve_device(cfg.device))
    log = log if group.leader else (lambda *a: None)  # only rank 0 logs and writes files
    devices = parallel.worker_devices(cfg, group.device, group)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    lock, pool = contextlib.ExitStack(), None
    group.on_leader(lambda: lock.enter_context(lock_out_dir(cfg.out_dir)))  # a second job stops here
    try:
        # a wrong path or model fails here, before anything is written (the workers load their own)
        resources = resources or load_resources(cfg, torch.device("cpu") if devices else group.device)
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
