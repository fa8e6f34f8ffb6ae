"""
WARP, the outer loop (Algorithm 1 of Ramé et al. 2024, arXiv 2406.16768):

    θ_init ← θ_sft
    for i in 1..I:
        for m in 1..M:   θ_m ← RL run from θ_init (own seed, own EMA anchor)
        θ_slerp ← SLERP(θ_init, {θ_m}, λ = 1/M)
        θ_init ← (1 − η) θ_init + η θ_slerp          (LITI)

Everything here is dense weights in the Hugging Face layout: each run's LoRA is folded into its
effective weights before merging, and the next iteration puts a fresh LoRA on the merged θ_init.

The pieces: one RL run in nanowarp/rl.py, the merges in nanowarp/merging.py. What the loop asks of
the disk and of other processes is one call each on a `Job` (nanowarp/jobs/job.py): the job folder
(--out_dir) with its crash safety, so that the same command resumes a stopped job, is
nanowarp/jobs/folder.py; the runs of an iteration side by side (--workers, torchrun) nanowarp/jobs/parallel.py.
"""

from nanowarp import merging
from nanowarp.config import validate
from nanowarp.jobs.job import open_job


def warp(cfg, resources=None, log=print):
    """Run Algorithm 1 in cfg.out_dir, resuming the job already there; returns the final θ_init
    (dense, Hugging Face layout). `resources`: the runs' rl.Resources, when already loaded. Under
    torchrun every rank calls this: each trains its share of the runs, rank 0 merges."""
    validate(cfg)
    merge = merging.slerp if cfg.merge == "slerp" else merging.lerp  # --merge lerp: the ablation
    with open_job(cfg, resources, log) as job:  # the job folder, locked, started or resumed
        theta_init = job.theta_sft()  # θ_init ← θ_sft
        for i in range(1, cfg.iterations + 1):
            missing = job.missing_runs(i)
            if missing is None:  # iteration i was done before a restart: its θ_init is on disk
                theta_init = job.load_liti(i) if job.leader else theta_init
            else:
                # RL runs. for m in 1..M: θ_m ← T steps of REINFORCE / RLOO from θ_init, seed
                # run_seed(i, m), on the reward r_β = r − β Σ_k log π_θm(y_k|…)/π_ema(y_k|…) (rl.rl_run);
                # after each step, EMA: θ_ema ← (1 − μ) θ_ema + μ θ_m (rl.ema_update)
                thetas = job.train_runs(i, missing, theta_init)  # all M of them on rank 0
                if job.leader:  # rank 0 merges; the other ranks of torchrun get θ_init below
                    # SLERP: θ_slerp ← SLERP(θ_init, {θ_m}, λ = 1/M), per tensor, of the task vectors θ_m − θ_init
                    theta_slerp = merge(theta_init, thetas)
                    job.save_slerp(i, theta_slerp)
                    # LITI: θ_init ← (1 − η) θ_init + η θ_slerp
                    theta_init = merging.liti(theta_init, theta_slerp, cfg.liti_rate)
                    job.save_liti(i, theta_init)
            theta_init = job.broadcast(theta_init)  # the new θ_init on every rank
    return theta_init
