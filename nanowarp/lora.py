"""
θ_m of Algorithm 1, the weights an RL run trains, as LoRA (Hu et al. 2021, arXiv 2106.09685): a frozen
weight W0 plus a trainable low-rank update,

    y = x W0ᵀ + b + s · (dropout(x) Aᵀ) Bᵀ,      A: (r, in), B: (out, r), s = alpha / r.

B starts at zero, so a freshly adapted model computes exactly what its base computes.

WARP never works on the factors A and B themselves: the EMA anchor and the merges act on the
*effective* dense weight W = W0 + s·B·A (the average of products is not the product of averages).
`effective_state_dict` gives those weights in the Hugging Face layout.

Sampling runs hundreds of forward passes with factors that do not change: inside `folded(model)`
every float32 LoRA layer computes with W0 + s·B·A, formed once (one small matmul per layer),
instead of its two extra matmuls per token.
"""

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanowarp.fast.matmul import linear


class LoRALinear(nn.Linear):
    """An nn.Linear whose frozen `weight`/`bias` are shared with the layer it adapts, plus
    `lora_A`/`lora_B`; its state-dict keys are those of the original layer plus the two factors."""

    def __init__(self, base, rank, alpha, dropout=0.0, dtype=None):
        nn.Module.__init__(self)  # not nn.Linear.__init__: reuse base's tensors, allocate nothing
        assert rank >= 1, "LoRA rank must be at least 1"
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        kw = dict(dtype=dtype or base.weight.dtype, device=base.weight.device)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and peft) initialise
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.folded = None  # W0 + s·B·A while `folded` is active (a separate tensor: W0 is never touched)

    def forward(self, x):
        if self.folded is not None:
            return linear(x, self.folded, self.bias)
        # float32 factors on a bf16 layer: the low-rank branch runs in float32, its output added in bf16
        # (the casts are no-ops when everything has one dtype)
        update = F.linear(F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B)
        if self.scale != 1.0:  # alpha = rank (the default) skips a pass over (rows, out) each way, exactly
            update = self.scale * update
        return linear(x, self.weight, self.bias) + update.to(x.dtype)

    def effective_weight(self, base=None):
        """W0 + s·B·A, (out, in), in the factors' dtype. base: W0 to use instead of the layer's own
        (a float32 master copy of a bf16 weight)."""
        w0 = self.weight if base is None else base
        return torch.addmm(w0.to(self.lora_A.dtype), self.lora_B, self.lora_A, alpha=self.scale)

    def delta_weight(self):
        """s·B·A (out, in), in the factors' dtype: what the LoRA adds to W0."""
        return self.scale * (self.lora_B @ self.lora_A)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, rank={self.lora_A.size(0)}, scale={self.scale:g}"


def default_targets(model):
    """Every linear layer inside the transformer blocks (attention and MLP; GPT-2's `transformer.h`,
    the Llama layout's `model.layers`); not the LM head."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and (".h." in f".{name}" or ".layers." in f".{name}")]


def named_targets(model, names):
    """The linear layers of the blocks whose own name is in `names`, comma-separated ("q_proj,v_proj",
    "c_attn"), in the model's order; "all": every one of them (default_targets)."""
    layers = default_targets(model)
    if names == "all":
        return layers
    names = names.split(",")
    known = sorted({layer.rpartition(".")[2] for layer in layers})
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--lora_targets {unknown[0]}: the model has no such layer in its blocks; it has "
                         f"{', '.join(known)} (or give all)")
    return [layer for layer in layers if layer.rpartition(".")[2] in names]


def add_lora(model, rank, alpha=None, dropout=0.0, targets=None, dtype=None):
    """Replace the named linear layers (default: `default_targets`) by LoRA layers, in place, and
    freeze every other parameter. alpha defaults to rank (scale 1). dtype: of the factors
    (default: the adapted weight's), e.g. float32 factors on a bf16 model."""
    targets = default_targets(model) if targets is None else targets
    for p in model.parameters():
        p.requires_grad_(False)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        if not isinstance(base, nn.Linear) or isinstance(base, LoRALinear):
            raise ValueError(f"cannot add LoRA to '{name}': it is a {type(base).__name__}, not a plain nn.Linear")
        setattr(parent, child, LoRALinear(base, rank, rank if alpha is None else alpha, dropout, dtype))
    return model


def lora_modules(model):
    """(name, LoRALinear) pairs of a model."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


@contextmanager
def folded(model):
    """Inside the block, every LoRA layer of model whose factors have its weight's dtype computes
    x·Wᵀ + b with its effective weight W = W0 + s·B·A, formed here once: one matmul per linear
    instead of three, for sampling, where the factors do not change. The same function to float
    rounding (~1e-7 relative), without gradient and without LoRA dropout: for eval mode only.

    W is a new tensor, dropped on exit; W0 itself is never written, so the layers after the block
    are bit for bit those before (an in-place W0 += s·B·A, then -= s·B·A, would leave rounding
    in W0 at every step). Costs the memory of one copy of the adapted matrices.
    float32 factors on bf16 layers (--dtype bfloat16) stay unfolded: W rounded to bf16 would lose
    every update below half a step of W0 (2⁻⁹ of it), most of what LoRA learns early."""
    if any(m.training and not isinstance(m.dropout, nn.Identity) for _, m in lora_modules(model)):
        raise RuntimeError("folded(model) leaves out LoRA dropout: call model.eval() first")
    layers = [m for _, m in lora_modules(model) if m.lora_A.dtype == m.weight.dtype]
    try:
        with torch.no_grad():
            for m in layers:
                m.folded = m.effective_weight()
        yield model
    finally:
        for m in layers:
            m.folded = None


@torch.no_grad()
def dense_state_dict(model):
    """The model's weights with every LoRA update folded in (W0 + s·B·A), under the keys of the
    plain model: what `load_state_dict` of an un-adapted copy accepts."""
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith((".lora_A", ".lora_B"))}
    for name, m in lora_modules(model):
        sd[f"{name}.weight"] = m.effective_weight()
    return sd


def effective_state_dict(model):
    """The effective dense weights (W0 + s·B·A) in the Hugging Face layout of the model."""
    return model.hf_state_dict(dense_state_dict(model))
