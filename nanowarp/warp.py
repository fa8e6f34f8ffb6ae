"""
WARP, the outer loop (Algorithm 1 of Ramé et al. 2024, arXiv 2406.16768):

    θ_init ← θ_sft
    for i in 1..I:
        for m in 1..M:   θ_m ← RL run from θ_init (own seed, own EMA anchor)
        θ_slerp ← SLERP(θ_init, {θ_m}, λ = 1/M)
        θ_init ← (1 − η) θ_init + η θ_slerp          (LITI)

Everything here is dense weights in the Hugging Face layout: each run's LoRA is folded into its
effective weights before merging, and the next iteration puts a fresh LoRA on the merged θ_init.
After iteration i the job has written OUT/iter_{i}/run_{m}/, OUT/iter_{i}/slerp/ and
OUT/iter_{i}/liti/ (the next θ_init), each a checkpoint with the policy's tokenizer files.
"""

import json
import os
import shutil
import time

import torch

from nanowarp import hub, merging
from nanowarp.data import load_prompts
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
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def load_resources(cfg):
    device = resolve_device(cfg.device)
    folder = hub.resolve(cfg.policy)
    gpt2_config = GPT2Config.from_hf(hub.load_config(folder), where=folder)
    tokenizer = load_tokenizer(folder)
    eos_id = gpt2_config.eos_token_id
    prompts = load_prompts(cfg.data, "train")
    reward_model = RewardModel(cfg.reward_model, device, kind=cfg.reward_kind, no_eos_penalty=cfg.no_eos_penalty)
    return Resources(gpt2_config, tokenizer, reward_model, prompts, eos_id, device)


def save_policy(folder, theta, gpt2_config, tokenizer_folder):
    """A complete Hugging Face checkpoint: weights, config, and the policy's tokenizer files."""
    for name in hub.TOKENIZER_FILES:
        src = os.path.join(tokenizer_folder, name)
        if os.path.isfile(src):
            hub.atomic_write(os.path.join(folder, name), lambda tmp: shutil.copyfile(src, tmp))
    hub.save_checkpoint(folder, gpt2_config.to_hf(), theta)  # config.json last: the folder is complete


def warp(cfg, res=None, log=print):
    """Run Algorithm 1; returns the final θ_init (dense, Hugging Face layout)."""
    validate(cfg)
    res = res or load_resources(cfg)
    policy_folder = hub.resolve(cfg.policy)
    theta_init = GPT2.from_pretrained(policy_folder).hf_state_dict()  # θ_sft, canonical keys
    os.makedirs(cfg.out_dir, exist_ok=True)
    metrics = open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a")
    merge = merging.slerp if cfg.merge == "slerp" else merging.lerp

    for i in range(1, cfg.iterations + 1):
        thetas = []
        for m in range(cfg.runs):
            seed = run_seed(cfg, i, m)
            start = time.perf_counter()

            def log_step(row, i=i, m=m):
                row = dict(iteration=i, run=m, **row)
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                if row["step"] % cfg.log_every == 0 or row["step"] == cfg.steps:
                    log(f"iter {i}/{cfg.iterations} run {m + 1}/{cfg.runs} step {row['step']:4d}/{cfg.steps} | "
                        f"reward {row['reward']:+.3f} kl {row['kl']:.3f} r_beta {row['r_beta']:+.3f} "
                        f"len {row['length']:5.1f} fin {row['finished']:.2f} lr {row['lr']:.2e} "
                        f"|g| {row['grad_norm']:.3f} {row['tokens_per_s']:.0f} tok/s")

            theta_m = rl_run(theta_init, m, seed, cfg, res, log_step)
            save_policy(os.path.join(cfg.out_dir, f"iter_{i}", f"run_{m}"), theta_m, res.gpt2_config, policy_folder)
            log(f"iter {i} run {m + 1}: done in {time.perf_counter() - start:.1f}s (seed {seed})")
            thetas.append(theta_m)

        theta_merged = merge(theta_init, thetas)  # SLERP(θ_init, {θ_m}, λ = 1/M), per tensor
        theta_init = merging.liti(theta_init, theta_merged, cfg.liti_rate)  # (1−η) θ_init + η θ_slerp
        save_policy(os.path.join(cfg.out_dir, f"iter_{i}", "slerp"), theta_merged, res.gpt2_config, policy_folder)
        save_policy(os.path.join(cfg.out_dir, f"iter_{i}", "liti"), theta_init, res.gpt2_config, policy_folder)
        log(f"iter {i}: merged {cfg.runs} runs ({cfg.merge}), LITI eta={cfg.liti_rate} -> {cfg.out_dir}/iter_{i}/liti")
    metrics.close()
    return theta_init

