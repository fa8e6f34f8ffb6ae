"""
One RL run of WARP (Algorithm 1 of Ramé et al. 2024, lines 4–10): REINFORCE or RLOO on a LoRA
policy, rewarded by nanowarp.reward's Reward (a classifier, reward functions, reward servers) and
regularised by a KL penalty against an EMA anchor. `rl_step` is one step, as the paper writes it:

    y ~ π_θ(·|x)
    r_β(x, y) = r(x, y) − β · Σ_k [log π_θ(y_k|x, y_<k) − log π_ema(y_k|x, y_<k)]
    A = r_β − b        (b = 0 for REINFORCE; the leave-one-out mean for RLOO)
    ∇ −mean[A · Σ_k log π_θ(y_k|x, y_<k)]

and `rl_run` the loop around it: θ ← AdamW(θ, that gradient), θ_ema ← (1 − μ) θ_ema + μ θ, with the
prompt order, precision, resuming, signals, logging and timing.

The KL term is a single-sample, sequence-level estimate on the sampled tokens; it is part of
the reward, so no gradient flows through it. The anchor is the EMA of the policy's *effective*
weights W0 + s·B·A, kept as a plain dense model (GPT-2 or Llama layout).
"""

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from nanowarp import hub
from nanowarp.config import resolve_device
from nanowarp.data import load_prepared_prompts
from nanowarp.logger import completion_rows
from nanowarp.logprobs import completion_logprobs, sampled_kl
from nanowarp.lora import add_lora, effective_state_dict, folded, lora_modules, named_targets
from nanowarp.memory import build_empty, set_weights
from nanowarp.models import eos_ids, from_config, load_config
from nanowarp.optim import adamw
from nanowarp.prompts import load_prompt_dataset, max_prompt_tokens
from nanowarp.reward import batch_columns, decode_texts, load_reward
from nanowarp.run_state import AnchorLinear, restore_training_state, training_state
from nanowarp.sampling import sample_micro_batches
from nanowarp.signals import Interrupted, stop_requested
from nanowarp.tokenizer import load_tokenizer


@dataclass
class Resources:
    """What every run of a job shares: loaded once per process."""
    model_config: object  # GPT2Config or LlamaConfig of the policy
    tokenizer: object  # the policy's tokenizers.Tokenizer
    reward: object  # nanowarp.reward.Reward
    prompts: list  # training prompts, lists of token ids
    eos_id: object  # the id that ends a completion, or a list of them (models.eos_ids)
    device: torch.device
    columns: dict = field(default_factory=dict)  # the prompt rows' other fields by name, lists aligned with prompts


def load_resources(cfg, device=None):
    """The Resources of a job's runs on `device` (default: --device): the policy's config and
    tokenizer, the reward (nanowarp.reward.load_reward: its functions loaded by path, in this process),
    and the training prompts (--prompts, or --data's), each checked to fit the context beside
    --max_new_tokens, with the --prompts rows' other fields as columns."""
    device = device or resolve_device(cfg.device)
    folder = hub.resolve(cfg.policy)
    model_config = load_config(folder)
    # a model without memory, for its layer names: --lora_targets fails here, not later
    named_targets(build_empty(lambda: from_config(model_config)), cfg.lora_targets)
    tokenizer = load_tokenizer(folder)
    # every prompt checked against the context now, not when it is first drawn, maybe hours in
    fit = dict(template=folder, chat=cfg.chat_template, truncate=cfg.truncate_prompts,
               max_tokens=max_prompt_tokens(model_config.n_positions, cfg.max_new_tokens))
    if cfg.prompts:
        dataset = load_prompt_dataset(cfg.prompts, tokenizer, cfg.prompt_key, **fit)
        prompts, columns = dataset.ids, dataset.columns
    else:
        prompts, columns = load_prepared_prompts(cfg.data, "train", tokenizer, **fit), {}
    reward = load_reward(cfg, device, getattr(torch, cfg.dtype))
    return Resources(model_config, tokenizer, reward, prompts, eos_ids(folder, model_config), device, columns=columns)


def rloo_advantages(rewards, k):
    """Leave-one-out advantages; rewards (B,) hold k consecutive completions per prompt.
    A_i = r_i − (Σ_j r_j − r_i) / (k − 1); k = 1 is plain REINFORCE (A = r)."""
    if k == 1:
        return rewards
    r = rewards.view(-1, k)
    baseline = (r.sum(1, keepdim=True) - r) / (k - 1)
    return (r - baseline).view(-1)


@torch.no_grad()
def ema_update(anchor, policy, mu, master=None):
    """θ_ema ← (1 − μ) θ_ema + μ (W0 + s·B·A), for every adapted matrix. The other weights are
    frozen at θ_init, where the anchor starts, so their EMA stays θ_init: nothing to do.

    bf16 (--dtype bfloat16): master holds, by module name, the float32 EMA of the update itself,
    δ = θ_ema − W0, so that δ ← (1 − μ) δ + μ s·B·A; the anchor computes with W0 + δ (AnchorLinear).
    In bf16 itself (8 bits of mantissa), μ·(W' − W) with μ = 0.01 is mostly below half a step of W:
    lost. δ needs no float32 copy of W0, which the policy holds in bf16."""
    for name, module in lora_modules(policy):
        if master is None:
            anchor.get_submodule(name).weight.lerp_(module.effective_weight(), mu)
        else:
            master[name].lerp_(module.delta_weight(), mu)


def decode(tokenizer, prompts, tokens, lengths):
    """Prompt + completion text for the reward model (EOS and padding dropped)."""
    ids = [p + t[:n] for p, t, n in zip(prompts, tokens.tolist(), lengths.tolist())]
    return tokenizer.decode_batch(ids, skip_special_tokens=True)


def check_finite(step, **values):
    for name, v in values.items():
        if not torch.isfinite(torch.as_tensor(v)).all():
            raise FloatingPointError(f"non-finite {name} at step {step}: stopping this run "
                                     f"(lower --lr, or set --grad_clip)")


def build_policy(theta, model_config, device, dtype=torch.float32):
    """A plain model (GPT-2 or Llama layout) holding the dense weights theta (Hugging Face layout) in
    dtype on device, built without random values: it takes theta's own tensors where they already
    are what it needs (on the CPU in float32: no frozen weight is ever written), copies otherwise."""
    # draws: LoRA's initialisation and dropout then draw what they drew when the models were random ones
    model = build_empty(lambda: from_config(model_config), draws=True)
    return model.load_hf_state_dict(theta, assign=True, device=device, dtype=dtype)


def build_anchor(policy, model_config, moving=True, master=None):
    """The anchor at θ_init: a plain model that shares the LoRA policy's tensors, so the frozen
    weights exist once. If the EMA moves it (`moving`), its adapted matrices are its own copies, or
    with `master` (bf16: {module name: δ}), W0 + δ formed at each forward (AnchorLinear)."""
    adapted = {f"{name}.weight" for name, _ in lora_modules(policy)} if moving and master is None else ()
    weights = {k: v.clone() if k in adapted else v for k, v in policy.state_dict().items()
               if not k.endswith((".lora_A", ".lora_B"))}
    anchor = build_empty(lambda: from_config(model_config), draws=True)
    set_weights(anchor, weights, assign=True)
    anchor.tie_weights()
    for name, delta in (master or {}).items():
        parent, _, child = name.rpartition(".")
        setattr(anchor.get_submodule(parent), child, AnchorLinear(anchor.get_submodule(name), delta))
    return anchor.eval().requires_grad_(False)


def micro_batches(batch_size, micro_batch_size):
    """Slices of a batch, micro_batch_size rows each (0: one slice, the whole batch)."""
    step = micro_batch_size or batch_size
    return [slice(start, start + step) for start in range(0, batch_size, step)]


@dataclass
class StepOutput:
    """What one rl_step returns, beside the gradient it leaves in the policy's LoRA factors."""
    loss: torch.Tensor  # −mean[A · Σ_k log π_θ(y_k|…)], detached
    metrics: dict  # reward, kl, r_beta, length, finished: batch means
    sources: dict  # reward/<name>: the batch mean of each reward source
    samples: object  # sampling.Samples: the completions y
    rewards: torch.Tensor  # r(x, y), (B,)
    kl: torch.Tensor  # Σ_k log π_θ(y_k|…) − log π_ema(y_k|…), (B,)


def rl_step(policy, anchor, prompts, columns, cfg, resources, generator, step=0, clock=lambda phase: None):
    """One step of Algorithm 1's inner loop up to the gradient, on a batch of prompts x (k copies of
    each, consecutive): sample y ~ π_θ(·|x), reward it, r_β = r − β·KL to the anchor, advantages
    (REINFORCE: A = r_β; RLOO: minus the leave-one-out mean), and the backward of the policy-gradient
    loss −mean[A · Σ_k log π_θ(y_k|…)]. `columns`: the prompt rows' other fields, for the reward;
    `clock(phase)` marks the end of each phase ("sample", "score", "anchor", "policy") for the timers.
    cfg.micro_batch_size rows go through each model at a time (micro_batches); the gradients accumulate."""
    chunks = micro_batches(len(prompts), cfg.micro_batch_size)  # whole RLOO groups (validate)

    # 1. sample y ~ π_θ(·|x), with the behaviour log-probs, from the LoRA folded into W0 + s·B·A
    policy.eval()
    with folded(policy):
        sampled = sample_micro_batches(policy, prompts, cfg.max_new_tokens, cfg.micro_batch_size, generator,
                                       eos_token_id=resources.eos_id, temperature=cfg.temperature)
    mask = sampled.mask.float()
    clock("sample")

    # 2. reward r(x, y) = Σ_s w_s r_s(x, y) of the decoded texts and the prompt rows' columns, −1 without EOS
    rewards, sources = score(resources, prompts, columns, sampled, chunks)
    clock("score")

    # 3. r_β = r − β · Σ_k log π_θ/π_ema (sequence level, sampled tokens, no gradient); the advantages
    with torch.no_grad():
        anchor_lp = torch.cat([completion_logprobs(anchor, sampled.prompt[c], sampled.prompt_mask[c],
                                                   sampled.tokens[c], cfg.temperature) for c in chunks])
    kl = sampled_kl(sampled.logprobs, anchor_lp, mask)
    r_beta = rewards - cfg.kl_coef * kl
    adv = rloo_advantages(r_beta, cfg.rloo_k)
    if cfg.whiten:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    if cfg.kl_per_token:  # token t is charged only the KL from t on: add back β · the KL before it
        token_kl = (sampled.logprobs - anchor_lp) * mask
        adv = adv[:, None] + cfg.kl_coef * (token_kl.cumsum(1) - token_kl)
    clock("anchor")

    # 4. the policy-gradient loss −mean[A · Σ_k log π_θ(y_k|…)] and its backward, one micro-batch at a
    #    time: each adds −Σ_{its rows}[…] / B to the loss and its gradient to the accumulated one
    policy.train()
    loss = 0.0
    for c in chunks:
        logp = completion_logprobs(policy, sampled.prompt[c], sampled.prompt_mask[c], sampled.tokens[c],
                                   cfg.temperature)
        if cfg.kl_per_token:  # A_t = r − β · Σ_{j ≥ t} log π/π_ema − baseline, per token
            part = -(adv[c] * logp * mask[c]).sum() / len(prompts)
        else:
            part = -(adv[c] * (logp * mask[c]).sum(1)).sum() / len(prompts)  # bit for bit .mean() of one chunk
        check_finite(step, reward=rewards, loss=part)
        part.backward()
        loss = loss + part.detach()
    clock("policy")
    metrics = dict(reward=rewards.mean().item(), kl=kl.mean().item(), r_beta=r_beta.mean().item(),
                   length=sampled.mask.sum(1).float().mean().item(), finished=sampled.finished.float().mean().item())
    return StepOutput(loss, metrics, sources, sampled, rewards, kl)


def score(resources, prompts, columns, sampled, chunks):
    """The rewards r(x, y) (B,) of the decoded prompts + completions, scored micro-batch by micro-batch,
    and the batch mean of each reward source, {"reward/<name>": mean}."""
    lengths = sampled.mask.sum(1)
    texts = decode_texts(resources.tokenizer, prompts, sampled.tokens, lengths)
    scored = [resources.reward.score(texts[c], sampled.finished[c], batch_columns(columns, range(len(prompts))[c]))
              for c in chunks]
    rewards = torch.cat([r for r, _ in scored]).to(resources.device)
    return rewards, {f"reward/{name}": torch.cat([parts[name] for _, parts in scored]).mean().item()
                     for name in scored[0][1]}


def rl_run(theta_init, run, seed, cfg, resources, log=lambda metrics: None, resume=None, save_state=None,
           log_completions=None):
    """Train one policy from θ_init (dense, Hugging Face layout) for cfg.steps steps of rl_step, each
    followed by the optimizer's step and the EMA anchor's update, and return its effective dense
    weights (Hugging Face layout, on the CPU). Around the algorithm, the infrastructure: the prompt
    order, precision, resuming, stopping on a signal, logging and timing.

    With `save_state`, the run calls save_state(training_state(...)) every cfg.save_every steps;
    `resume`, such a state, continues the run from there with the same result as a run never stopped.
    With `log_completions`, every cfg.log_completions steps it gets (step, a few completion rows).
    After a SIGINT / SIGTERM (signals.stop_requested) it saves that state (with save_every) and raises
    signals.Interrupted at the end of the step, unless that was the last one.

    cfg.dtype bfloat16: the policy's frozen weights, the anchor (which shares them) and the sampler
    run in bf16; the LoRA factors, AdamW's state, the anchor's master (`master`: the EMA of the adapted
    matrices' update, δ = θ_ema − W0), the log-probs, the KL and the returned weights are float32
    (docs/precision.md#which-tensor-is-in-which-dtype)."""
    device, k, dtype = resources.device, cfg.rloo_k, getattr(torch, cfg.dtype)
    torch.manual_seed(seed)  # LoRA's A initialisation
    policy = build_policy(theta_init, resources.model_config, device, dtype)
    policy = add_lora(policy, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, named_targets(policy, cfg.lora_targets),
                      dtype=torch.float32)
    policy.gradient_checkpointing = cfg.gradient_checkpointing
    master = None
    if dtype != torch.float32 and cfg.anchor == "ema":  # the anchor's float32 EMA master: δ = θ_ema − W0, from 0
        master = {name: torch.zeros_like(m.weight, dtype=torch.float32) for name, m in lora_modules(policy)}
    anchor = build_anchor(policy, resources.model_config, cfg.anchor == "ema", master)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt, sched = adamw(params, cfg.lr, cfg.weight_decay, cfg.warmup, cfg.steps, cfg.optimizer,
                       (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_epsilon)
    generator = torch.Generator(device).manual_seed(seed)  # this run's sampling
    order = np.random.default_rng(seed)  # this run's prompt order
    n_prompts = cfg.batch_size // k
    start, queue = 0, []
    if resume is not None:
        start, queue = restore_training_state(resume, policy, anchor, opt, sched, generator, order, master)

    for step in range(start, cfg.steps):
        marks = {"start": time.perf_counter()}
        while len(queue) < n_prompts:  # a fresh permutation of the prompt set each epoch
            queue += order.permutation(len(resources.prompts)).tolist()
        batch, queue = queue[:n_prompts], queue[n_prompts:]
        rows = [i for i in batch for _ in range(k)]  # k consecutive copies of each prompt
        prompts, columns = [resources.prompts[i] for i in rows], batch_columns(resources.columns, rows)

        opt.zero_grad(set_to_none=True)
        out = rl_step(policy, anchor, prompts, columns, cfg, resources, generator, step + 1,
                      clock=lambda phase: marks.__setitem__(phase, time.perf_counter()))
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        check_finite(step + 1, gradient=grad_norm)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        marks["optimizer"] = time.perf_counter()
        if cfg.anchor == "ema":  # θ_ema ← (1 − μ) θ_ema + μ θ, after every optimizer step
            ema_update(anchor, policy, cfg.ema_rate, master)
        marks["ema"] = time.perf_counter()

        lengths = out.samples.mask.sum(1)
        log(dict(step=step + 1, **out.metrics, lr=lr, grad_norm=grad_norm.item(), loss=out.loss.item(),
                 tokens_per_s=lengths.sum().item() / (marks["ema"] - marks["start"]), **timers(marks), **out.sources))
        if log_completions is not None and cfg.log_completions and (step + 1) % cfg.log_completions == 0:
            log_completions(step + 1, completion_rows(resources.tokenizer, prompts, out.samples.tokens, lengths,
                                                      out.rewards, out.kl))
        stop = stop_requested() if step + 1 < cfg.steps else 0  # SIGINT / SIGTERM: stop after this step
        if save_state is not None and cfg.save_every and step + 1 < cfg.steps and \
                ((step + 1) % cfg.save_every == 0 or stop):
            save_state(training_state(step + 1, policy, anchor, opt, sched, generator, order, queue, master))
        if stop:
            raise Interrupted(stop, step + 1)

    if dtype == torch.float32:
        theta = effective_state_dict(policy)
    else:  # θ_init's float32 weights, the adapted ones W0 + s·B·A over θ_init's float32 W0
        with torch.no_grad():
            delta = policy.hf_state_dict({f"{name}.weight": m.delta_weight() for name, m in lora_modules(policy)})
            theta = {k: v.float() + delta[k].cpu() if k in delta else v.float() for k, v in theta_init.items()}
    return {name: t.detach().cpu() for name, t in theta.items()}


def timers(marks):
    """The seconds of a step's phases, from the times `marks` at the end of each (and at "start")."""
    return dict(time_sample=marks["sample"] - marks["start"], time_score=marks["score"] - marks["sample"],
                time_update=marks["ema"] - marks["score"], time_anchor=marks["anchor"] - marks["score"],
                time_policy=marks["policy"] - marks["anchor"], time_optimizer=marks["optimizer"] - marks["policy"],
                time_ema=marks["ema"] - marks["optimizer"])
