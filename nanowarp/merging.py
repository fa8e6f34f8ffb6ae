"""
Weight merging for WARP, the last two lines of Algorithm 1's iteration, on dense state dicts:

    θ_slerp ← SLERP(θ_init, {θ_m}, λ = 1/M)        of the task vectors δ_m = θ_m − θ_init
    θ_init ← (1 − η) θ_init + η θ_slerp            LITI (LERP is the ablation of SLERP)

References: Ramé et al. 2024, "WARP: On the Benefits of Weight Averaged Rewarded Policies"
(arXiv 2406.16768), section 3 and appendix B.3; Shoemake 1985 for SLERP.

Everything works per tensor: each weight matrix or vector gets its own angle, as in the paper
("layer by layer, each having a different angle"), never one global angle over the flattened
model. A state dict here is a dict name -> tensor with dense (effective) weights: merge LoRA
models only after folding W0 + s·B·A, since SLERP of the factors A and B is a different model.

Arithmetic runs in float64 and is cast back to each tensor's dtype and device, so fp16/bf16
checkpoints merge without overflow or lost precision. Tensors that no run changed (frozen
weights, buffers such as causal masks) are returned unchanged; a non-floating tensor
(an integer or boolean buffer) that differs between checkpoints is an error, not merged.
"""

import dataclasses
import math

import numpy as np
import torch

# Below this sin Ω (Ω within ~0.006° of 0° or 180°), the 1/sin Ω coefficients are too
# ill-conditioned to trust: near 180°, acos of a float64 cos with rounding error ~1e-13 is off
# by ~1e-7 rad; near 0°, LERP differs from SLERP by < Ω²/8 ≈ 1e-9 relative, so the fallback
# to LERP costs nothing.
SIN_EPS = 1e-4


def check_compatible(dicts, names=None, configs=None):
    """Raise ValueError unless all state dicts have the same keys and the same shapes, and (given
    their model configs, dataclasses such as GPT2Config or LlamaConfig) the same architecture: the
    same class and fields (those marked compare=False aside); the message names the first difference."""
    names = names or [f"checkpoint {i}" for i in range(len(dicts))]
    ref, ref_name = dicts[0], names[0]
    for i, (d, name) in enumerate(zip(dicts[1:], names[1:]), 1):
        if configs and type(configs[i]) is not type(configs[0]):
            raise ValueError(f"{name} is a {getattr(configs[i], 'model_type', 'gpt2')} model but {ref_name} a "
                             f"{getattr(configs[0], 'model_type', 'gpt2')} one: merge only checkpoints of the same "
                             f"architecture")
        for f in dataclasses.fields(configs[0]) if configs else ():
            if not f.compare:  # LlamaConfig.hf: config.json as read, with its transformers_version
                continue
            a, b = getattr(configs[0], f.name), getattr(configs[i], f.name)
            if a != b:
                raise ValueError(f"{name} has {f.name}={b} but {ref_name} has {f.name}={a}: "
                                 f"merge only checkpoints of the same architecture")
        for k, v in ref.items():
            if k not in d:
                raise ValueError(f"{name} has no tensor '{k}' that {ref_name} has; "
                                 f"merge only checkpoints of the same architecture")
            if d[k].shape != v.shape:
                raise ValueError(f"tensor '{k}' has shape {tuple(v.shape)} in {ref_name} but "
                                 f"{tuple(d[k].shape)} in {name}; "
                                 f"merge only checkpoints of the same architecture")
        extra = [k for k in d if k not in ref]
        if extra:
            raise ValueError(f"{name} has tensor '{extra[0]}' that {ref_name} does not have; "
                             f"merge only checkpoints of the same architecture")


def task_vector(init, theta):
    """δ = θ − θ_init, per tensor."""
    check_compatible([init, theta], ["init", "theta"])
    return {k: theta[k] - init[k] for k in init}


def task_vector_stats(init, thetas, merged):
    """How the task vectors δ_m = θ_m − θ_init of M runs and their merge's δ_merge lie, in float64,
    one tensor at a time:

        cos                    cos(δ_i, δ_j) over the whole model, the mean over pairs i < j
        cos_per_tensor_mean    the per-tensor cos Ω (the angles SLERP works with) over the pairs and
        cos_per_tensor_median  the tensors both runs changed: mean and median; tensors: how many
        norm_1 .. norm_M       ‖δ_m‖
        merge_norm_ratio       ‖δ_merge‖ / mean_m ‖δ_m‖: SLERP keeps the norm when the ‖δ_m‖ are
                               equal (Lemma 1), LERP shrinks it when the runs disagree

    A quantity with nothing to measure (one run, a zero task vector, no tensor changed) is None."""
    m = len(thetas)
    pairs = [(i, j) for i in range(m) for j in range(i + 1, m)]
    dots, sq_norms, merged_sq_norm, per_tensor = {p: 0.0 for p in pairs}, [0.0] * m, 0.0, []
    for k in init:
        base = init[k].double().flatten()
        deltas = [t[k].double().flatten() - base for t in thetas]
        norms = [d.norm().item() for d in deltas]
        for i, j in pairs:
            dot = (deltas[i] @ deltas[j]).item()
            dots[i, j] += dot
            if norms[i] > 0 and norms[j] > 0:
                per_tensor.append(dot / (norms[i] * norms[j]))
        sq_norms = [s + n ** 2 for s, n in zip(sq_norms, norms)]
        merged_sq_norm += (merged[k].double().flatten() - base).square().sum().item()
    norms = [math.sqrt(s) for s in sq_norms]
    whole = [dots[i, j] / (norms[i] * norms[j]) for i, j in pairs if norms[i] > 0 and norms[j] > 0]
    mean_norm = sum(norms) / m
    return dict(cos=sum(whole) / len(whole) if pairs and len(whole) == len(pairs) else None,
                cos_per_tensor_mean=sum(per_tensor) / len(per_tensor) if per_tensor else None,
                cos_per_tensor_median=float(np.median(per_tensor)) if per_tensor else None,
                tensors=len(per_tensor), **{f"norm_{i + 1}": n for i, n in enumerate(norms)},
                merge_norm_ratio=math.sqrt(merged_sq_norm) / mean_norm if mean_norm > 0 else None)


def _slerp_deltas(d1, d2, lam):
    """SLERP of two float64 task vectors (any shape), with LERP where the angle is undefined."""
    n1, n2 = d1.norm().item(), d2.norm().item()
    if n1 > 0 and n2 > 0:
        cos = max(-1.0, min(1.0, torch.dot(d1.flatten(), d2.flatten()).item() / n1 / n2))
        omega = math.acos(cos)                                # cos Ω = <δ1,δ2> / (‖δ1‖‖δ2‖)
        if math.sin(omega) > SIN_EPS:
            c1 = math.sin((1 - lam) * omega) / math.sin(omega)  # sin((1−λ)Ω) / sin Ω
            c2 = math.sin(lam * omega) / math.sin(omega)        # sin(λΩ) / sin Ω
            return c1 * d1 + c2 * d2
    return (1 - lam) * d1 + lam * d2  # a zero task vector, or parallel/antiparallel: LERP


def _merge_tensor(name, init, thetas, combine):
    """init + combine([δ_1..δ_M]) for one tensor, computed in float64, in init's dtype/device."""
    if all(torch.equal(t.to(init.device), init) for t in thetas):
        return init.clone()  # frozen weights and buffers: untouched, bit exact
    if not init.is_floating_point():
        raise ValueError(f"tensor '{name}' ({init.dtype}) differs between checkpoints; "
                         f"integer/boolean buffers cannot be merged")
    base = init.to(torch.float64)
    merged = base + combine([t.to(init.device, torch.float64) - base for t in thetas])
    # SLERP keeps norms and can leave the inputs' range: saturate rather than overflow to inf.
    info = torch.finfo(init.dtype)
    return merged.clamp(info.min, info.max).to(init.dtype)


def _check_models(init, thetas, lam):
    if len(thetas) == 0:
        raise ValueError("need at least one fine-tuned model to merge")
    if lam is not None and len(thetas) != 2:
        raise ValueError(f"an explicit lam is only defined for 2 models, got {len(thetas)}; "
                         f"leave lam unset for uniform weights")
    if lam is not None and not 0 <= lam <= 1:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    check_compatible([init, *thetas], ["init"] + [f"model {m + 1}" for m in range(len(thetas))])


def slerp_pair(init_t, t1, t2, lam):
    """SLERP of two tensors around init_t: init + sin((1−λ)Ω)/sin Ω·δ1 + sin(λΩ)/sin Ω·δ2."""
    return _merge_tensor("tensor", init_t, [t1, t2], lambda ds: _slerp_deltas(ds[0], ds[1], lam))


def slerp(init, thetas, lam=None):
    """Spherical merge of M task vectors, per tensor.

    M = 2: slerp with rate lam (default 1/2). M > 2 (paper, appendix B.3), recursively:
    slerp_M = slerp(init, slerp_{M−1}(θ_1..θ_{M−1}), θ_M, λ = 1/M), so model k enters with λ = 1/k.
    """
    _check_models(init, thetas, lam)
    if len(thetas) == 1:
        return {k: v.clone() for k, v in thetas[0].items()}

    def combine(ds):
        merged = ds[0]
        for k in range(2, len(ds) + 1):
            merged = _slerp_deltas(merged, ds[k - 1], lam if lam is not None else 1 / k)
        return merged

    return {k: _merge_tensor(k, init[k], [t[k] for t in thetas], combine) for k in init}


def lerp(init, thetas, lam=None):
    """Linear merge init + Σ_m w_m δ_m: w_m = 1/M, or (1−λ, λ) for M = 2 with an explicit lam."""
    _check_models(init, thetas, lam)
    w = [1 - lam, lam] if lam is not None else [1 / len(thetas)] * len(thetas)

    def combine(ds):
        return sum(w_m * d for w_m, d in zip(w, ds))

    return {k: _merge_tensor(k, init[k], [t[k] for t in thetas], combine) for k in init}


def liti(theta_a, theta_b, eta):
    """Linear interpolation towards initialization: (1−η)·θ_a + η·θ_b, per tensor."""
    if not 0 <= eta <= 1:
        raise ValueError(f"LITI rate eta must be in [0, 1] (0 keeps theta_a, 1 gives theta_b), got {eta}")
    check_compatible([theta_a, theta_b], ["theta_a", "theta_b"])
    if eta == 0 or eta == 1:  # exact end points, no float64 round trip
        return {k: v.clone() for k, v in (theta_b if eta == 1 else theta_a).items()}
    # (1−η)θ_a + ηθ_b = θ_a + η(θ_b − θ_a)
    return {k: _merge_tensor(k, theta_a[k], [theta_b[k]], lambda ds: eta * ds[0]) for k in theta_a}
