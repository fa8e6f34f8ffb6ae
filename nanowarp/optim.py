"""
The optimizer of every training stage (the RL runs, the reward model, SFT): AdamW, its learning
rate warmed up linearly to the peak over `warmup` steps, then decayed linearly to 0 at the last step.
The RL runs may also take Adam without its second moment (`Momentum`: the bias-corrected moving
average of the gradients, β1 = 0 being plain SGD), and AdamW's β1, β2 and ε (--optimizer, --adam_*).
"""

import torch


def lr_factor(step, warmup, total):
    """Linear warm-up over `warmup` steps, then linear decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


class AdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter 2019) as torch.optim.AdamW computes it on the CPU, one tensor at a time,
    bit for bit, with the same state_dict (tests/test_optim.py). Written here because torch's guards
    against torch.compile around its optimizers' methods import torch._dynamo on first use: 2 s and
    ~100 MB in every process that trains (each worker, each torchrun rank), for a compiler never used."""
    # torch.optim.Optimizer's own methods, taken from inside those guards (as they are if torch drops them)
    add_param_group, zero_grad, state_dict, load_state_dict = (
        getattr(f, "__wrapped__", f) for f in (torch.optim.Optimizer.add_param_group, torch.optim.Optimizer.zero_grad,
                                               torch.optim.Optimizer.state_dict, torch.optim.Optimizer.load_state_dict))

    def __init__(self, params, lr, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:  # torch's: the step count a float32 tensor, the moments zeros like p
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                t = state["step"].item()
                p.mul_(1 - lr * group["weight_decay"])  # decoupled weight decay
                m.lerp_(p.grad, 1 - beta1)  # m ← β1 m + (1 − β1) g
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)  # v ← β2 v + (1 − β2) g²
                denom = (v.sqrt() / (1 - beta2 ** t) ** 0.5).add_(eps)  # √v̂ + ε
                p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))  # p ← p − lr · m̂ / (√v̂ + ε)


class Momentum(AdamW):
    """Adam without its second moment: p ← p · (1 − lr · λ) − lr · m̂, m̂ the bias-corrected moving average
    of the gradients (β1; 0 is plain SGD). Its step is the gradient's size, not a per-coordinate unit."""

    def __init__(self, params, lr, weight_decay=0.01, beta1=0.9):
        super().__init__(params, lr, weight_decay, betas=(beta1, None), eps=None)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, (beta1, _) = group["lr"], group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                p.mul_(1 - lr * group["weight_decay"])
                state["exp_avg"].lerp_(p.grad, 1 - beta1)
                p.add_(state["exp_avg"], alpha=-lr / (1 - beta1 ** state["step"].item()))


def adamw(params, lr, weight_decay, warmup, total, optimizer="adamw", betas=(0.9, 0.999), eps=1e-8):
    """The optimizer over `params` (AdamW with `betas` and `eps`, or Momentum with β1 = betas[0]) and its
    schedule (lr · lr_factor(step, warmup, total)): step both once per update."""
    if optimizer == "adamw":
        opt = AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps)
    elif optimizer == "momentum":
        opt = Momentum(params, lr=lr, weight_decay=weight_decay, beta1=betas[0])
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}: adamw or momentum")
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, warmup, total))
