"""
Evaluating policies the way the WARP paper plots them: one point (KL to the reference, reward)
per model, and a line of points per LITI sweep, whose upper-left envelope is the Pareto front.

For each prompt x, one completion y ~ π(·|x) (plain sampling at `temperature`), then

    reward(x, y)  = r(x, y), or −1 when y did not emit EOS within max_new_tokens
    KL(π‖π_ref)  ≈ Σ_k [log π(y_k|x, y_<k) − log π_ref(y_k|x, y_<k)]      (k up to and including EOS)

averaged over the prompts. The KL estimate is single-sample and unbiased, so it can come out
slightly negative for models close to the reference. Both log-probs are taken at the sampling
temperature (the sampler returns π's; π_ref's come from one forward pass over prompt + y).

Sampling draws from a torch.Generator seeded with `seed`: the same seed, batch size and device
give the same completions. Every model evaluated with the same seed consumes the same random
numbers (common random numbers), so differences between models, and between the η of a sweep,
are less noisy than independent draws would make them.
"""

import math

import torch

from nanowarp import merging
from nanowarp.rl import completion_logprobs, decode
from nanowarp.sampling import sample


def mean_and_se(values):
    """Mean and standard error of the mean of a 1-D tensor (se is None for a single value)."""
    values = values.double()
    n = values.numel()
    se = (values.std() / math.sqrt(n)).item() if n > 1 else None
    return values.mean().item(), se


@torch.no_grad()
def evaluate(policy, ref, reward_model, prompts, tokenizer, eos_id, max_new_tokens=128, temperature=1.0,
             batch_size=64, seed=0):
    """KL(π‖π_ref) and reward of `policy` on `prompts` (lists of token ids), one completion each.

    policy, ref: GPT2 models (same vocabulary; in eval mode if they have dropout); reward_model: nanowarp.reward.RewardModel;
    tokenizer: the policy's tokenizers.Tokenizer, to decode prompt + completion for the reward.
    Returns dict(kl, reward, finished, length, n, kl_se, reward_se): means over prompts, finished
    = fraction that emitted EOS, length = mean completion tokens (EOS included), *_se = standard
    errors of the means.
    """
    device = policy.lm_head.weight.device
    ref_device = ref.lm_head.weight.device
    generator = torch.Generator(device).manual_seed(seed)
    kls, rewards, finished, lengths = [], [], [], []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        s = sample(policy, batch, max_new_tokens, eos_token_id=eos_id, temperature=temperature,
                   generator=generator)
        ref_logprobs = completion_logprobs(ref, s.prompt.to(ref_device), s.prompt_mask.to(ref_device),
                                           s.tokens.to(ref_device), temperature)
        # Σ_k log π(y_k|…) − log π_ref(y_k|…), over the completion's tokens only (mask: up to EOS)
        kls.append(((s.logprobs.to(ref_device) - ref_logprobs) * s.mask.to(ref_device)).sum(1).cpu())
        n_tokens = s.mask.sum(1)
        rewards.append(reward_model.score(decode(tokenizer, batch, s.tokens, n_tokens), s.finished))
        finished.append(s.finished.cpu())
        lengths.append(n_tokens.cpu())
    kl, kl_se = mean_and_se(torch.cat(kls))
    reward, reward_se = mean_and_se(torch.cat(rewards))
    return dict(kl=kl, reward=reward, finished=torch.cat(finished).double().mean().item(),
                length=torch.cat(lengths).double().mean().item(), n=len(prompts), kl_se=kl_se, reward_se=reward_se)


def liti_sweep(theta_a, theta_b, etas, policy, ref, reward_model, prompts, tokenizer, eos_id, log=None, **kwargs):
    """evaluate() of (1−η)·θ_a + η·θ_b for each η in etas, without writing any checkpoint.

    theta_a, theta_b: dense state dicts in the Hugging Face layout (GPT2.hf_state_dict()).
    policy: a GPT2 of their architecture whose weights are overwritten for each η (one model in
    memory, whatever the number of points); not the model theta_a or theta_b are views of.
    kwargs go to evaluate(); log(eta, result), if given, is called after each point.
    Returns a list of evaluate() dicts, each with its `eta`.
    """
    merging.check_compatible([theta_a, theta_b], ["sweep start", "sweep end"])
    results = []
    for eta in etas:
        policy.load_hf_state_dict(merging.liti(theta_a, theta_b, eta), where=f"LITI eta={eta}")
        result = dict(eta=eta, **evaluate(policy, ref, reward_model, prompts, tokenizer, eos_id, **kwargs))
        if log is not None:
            log(eta, result)
        results.append(result)
    return results


def plot(results, path, log=print):
    """KL (x) against reward (y): one labelled point per model, one line per LITI sweep.

    results: rows with `model`, `kl`, `reward`, and for sweep points `sweep` (the line they
    belong to) and `eta`. Writes a PNG to path and returns True, or returns False with a note
    when matplotlib is not installed (it is optional: pip install matplotlib).
    """
    try:
        from matplotlib.figure import Figure  # the object API: no pyplot, no global backend state
    except ImportError:
        log("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.add_subplot()
    sweeps = {}
    for row in results:
        if row.get("sweep") is not None:
            sweeps.setdefault(row["sweep"], []).append(row)
        else:
            ax.plot(row["kl"], row["reward"], "o")
            ax.annotate(row["model"], (row["kl"], row["reward"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
    for name, rows in sweeps.items():
        rows = sorted(rows, key=lambda r: r["eta"])
        line, = ax.plot([r["kl"] for r in rows], [r["reward"] for r in rows], ".-", label=name)
        for r in (rows[0], rows[-1]):  # mark the ends of the sweep with their η
            ax.annotate(f"η={r['eta']:g}", (r["kl"], r["reward"]), textcoords="offset points", xytext=(4, -10),
                        fontsize=7, color=line.get_color())
    if sweeps:
        ax.legend(fontsize=7)
    ax.set_xlabel("KL(π ‖ π_ref)")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=150)
    return True
