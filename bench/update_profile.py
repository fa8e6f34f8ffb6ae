"""
Where nanowarp's update goes, for `bench/rl_step.py --profile`: the update as `rl_run` runs it
(anchor log-probs, policy forward and backward, AdamW, EMA) on one sampled batch, by phase and by
operator, against its floor: the same matmuls timed alone.
"""

import math
import statistics
import time

import torch

from nanowarp.logprobs import completion_logprobs
from nanowarp.lora import add_lora, default_targets, folded
from nanowarp.fast.matmul import linear
from nanowarp.optim import AdamW
from nanowarp.rl import build_policy, ema_update
from nanowarp.sampling import sample


def profile_update(theta, res, shape, cfg, k, seed, phase_names, repeats=3):
    """nanowarp's update as rl_run runs it (anchor log-probs, policy forward and backward, AdamW,
    EMA) on one sampled batch: its phases (medians of `repeats`), its top operators, and the
    matmuls alone of the same shapes, its floor."""
    from torch.profiler import profile
    B, device = shape["batch"], torch.device("cpu")
    torch.manual_seed(seed)
    policy = add_lora(build_policy(theta, res.model_config, device), cfg.lora_rank, cfg.lora_alpha)
    anchor = build_policy(theta, res.model_config, device).eval().requires_grad_(False)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    prompts = [res.prompts[i] for i in range(B // k) for _ in range(k)]
    with folded(policy.eval()):
        s = sample(policy, prompts, shape["new_tokens"], res.eos_id, generator=torch.Generator().manual_seed(seed))
    mask, adv = s.mask.float(), torch.randn(B, generator=torch.Generator().manual_seed(seed))  # any advantages

    def update():
        t0 = time.perf_counter()
        with torch.no_grad():
            completion_logprobs(anchor, s.prompt, s.prompt_mask, s.tokens, cfg.temperature)
        t1 = time.perf_counter()
        policy.train()
        opt.zero_grad(set_to_none=True)
        logp = completion_logprobs(policy, s.prompt, s.prompt_mask, s.tokens, cfg.temperature)
        (-(adv * (logp * mask).sum(1)).sum() / B).backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, math.inf)
        opt.step()
        t3 = time.perf_counter()
        ema_update(anchor, policy, cfg.ema_rate)
        return dict(anchor=t1 - t0, policy=t2 - t1, optimizer=t3 - t2, ema=time.perf_counter() - t3)

    update()  # warm-up
    runs = [update() for _ in range(repeats)]
    med = {p: statistics.median(r[p] for r in runs) for p in runs[0]}
    P, N = s.prompt.size(1), s.tokens.size(1)
    print(f"\n  nanowarp's update, {B} completions, prompts padded to {P} tokens, {N} new: {sum(med.values()):.3f} s = "
          + ", ".join(f"{phase_names[p]} {v:.3f}" for p, v in med.items()))
    with profile() as prof:
        update()
    print("  its top operators by self CPU time (one update)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    floor = update_floor(anchor, B, P, N)
    print(f"  so the update is at {floor / (med['anchor'] + med['policy']):.0%} of its matmul floor "
          f"(anchor + policy: {med['anchor'] + med['policy']:.3f} s)")


@torch.no_grad()
def update_floor(model, B, P, N, repeats=3):
    """Seconds the matmuls of the update take on their own: the anchor's and the policy's forward
    through the block linears (those of `model`, GPT-2 or Llama layout) over B x (P + N - 1)
    positions and the LM head over the B x N that predict completion tokens, and the policy's
    backward to the activations through the same matmuls (W0 and the head are frozen: no weight
    gradients but the LoRA factors', rank-r products left out, as is the low-rank branch of the
    forward). Random inputs of the same shapes, the orientations fast.matmul.linear picks; medians of `repeats`."""
    rows = B * (P + N - 1)
    body = [model.get_submodule(name).weight.shape for name in default_targets(model)]
    head = model.lm_head.weight.shape
    weights = [(torch.randn(o, i) * 0.02, rows) for o, i in body] + [(torch.randn(*head) * 0.02, B * N)]
    x = {(n, r): torch.randn(r, n) for w, r in weights for n in w.shape}
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(2):  # anchor forward, policy forward
            for w, r in weights:
                linear(x[w.size(1), r], w)
        for w, r in weights:  # policy backward: dL/dx = dL/dy · W
            x[w.size(0), r] @ w
        runs.append(time.perf_counter() - t0)
    flop = 3 * sum(2 * r * w.numel() for w, r in weights)
    seconds = statistics.median(runs)
    print(f"  update's matmuls alone (anchor fwd, policy fwd and bwd to the activations, {B} x {P + N - 1} "
          f"positions, LM head on {B} x {N}): {seconds:.3f} s ({flop / seconds / 1e9:.0f} GFLOP/s)")
    return seconds
