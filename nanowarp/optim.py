"""
The optimizer of every training stage (the RL runs, the reward model, SFT): AdamW, its learning
rate warmed up linearly to the peak over `warmup` steps, then decayed linearly to 0 at the last step.
"""

import torch


def lr_factor(step, warmup, total):
    """Linear warm-up over `warmup` steps, then linear decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def adamw(params, lr, weight_decay, warmup, total):
    """AdamW over `params` and its schedule (lr · lr_factor(step, warmup, total)): step both once per update."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, warmup, total))
