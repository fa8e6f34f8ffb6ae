"""
What an RL run (nanowarp/rl.py) carries besides the algorithm: the state that resumes it exactly
(`training_state`, `restore_training_state`: the job folder saves and loads it, nanowarp/jobs/folder.py),
and in bf16 the anchor's adapted layers, W0 + δ with δ the float32 EMA master (`AnchorLinear`).
"""

import torch
import torch.nn as nn

from nanowarp.fast.matmul import linear
from nanowarp.lora import lora_modules


class AnchorLinear(nn.Module):
    """bf16: an adapted matrix of the anchor, W0 + δ, never stored: W0 is the policy's frozen bf16
    weight (shared), δ the float32 EMA master (a buffer); each forward rounds W0 + δ to bf16 once,
    one matrix at a time, instead of a bf16 copy of every adapted matrix held beside the policy's."""

    def __init__(self, linear_layer, delta):
        super().__init__()
        self.weight, self.bias = linear_layer.weight, linear_layer.bias
        self.register_buffer("delta", delta, persistent=False)

    def forward(self, x):
        return linear(x, (self.weight.float() + self.delta).to(self.weight.dtype), self.bias)


def training_state(step, policy, anchor, opt, sched, generator, order, queue, master=None):
    """Everything a run needs to continue after `step` steps exactly as if never stopped: the LoRA
    factors, the EMA anchor's adapted weights (in bf16 its float32 master δ), AdamW and schedule
    state, and every random stream. It holds the live tensors (no copies): save it before the next step."""
    adapted = [name for name, _ in lora_modules(policy)]
    return dict(step=step, lora={n: p.detach() for n, p in policy.named_parameters() if p.requires_grad},
                anchor=master or {n: anchor.get_submodule(n).weight.detach() for n in adapted},
                optimizer=opt.state_dict(), scheduler=sched.state_dict(), generator=generator.get_state(),
                order=order.bit_generator.state, queue=list(queue), torch_rng=torch.get_rng_state(),
                cuda_rng=torch.cuda.get_rng_state(generator.device) if generator.device.type == "cuda" else None)


@torch.no_grad()
def restore_training_state(state, policy, anchor, opt, sched, generator, order, master=None):
    """Load a `training_state` back; returns (steps done, prompt queue)."""
    params = dict(policy.named_parameters())
    for n, v in state["lora"].items():
        params[n].copy_(v)
    for n, v in state["anchor"].items():
        (anchor.get_submodule(n).weight if master is None else master[n]).copy_(v)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    order.bit_generator.state = state["order"]
    torch.set_rng_state(state["torch_rng"])  # LoRA dropout
    if state["cuda_rng"] is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], generator.device)
    return state["step"], list(state["queue"])
