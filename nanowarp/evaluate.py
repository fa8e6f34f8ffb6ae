"""
Evaluating policies the way the WARP paper plots them: one point (KL to the reference, reward)
per model, and a line of points per LITI sweep, whose upper-left envelope is the Pareto front.

For each prompt x, one completion y ~ π(·|x) (plain sampling at `temperature`), then

    reward(x, y)  = r(x, y), or −1 when y did not emit EOS within max_new_tokens
    KL(π‖π_ref)  ≈ Σ_k [log π(y_k|x, y_<k) − log π_ref(y_k|x, y_<k)]      (k up to and including EOS)

averaged over the prompts. The KL estimate is single-sample and unbiased, so it can come out
slightly negative for models close to the reference. Both log-probs are taken at the sampling
temperature (the sampler returns π's; π_ref's come from one forward pass over prompt + y).

Along the same samples, the other axes of the paper:

    kl_exact    = Σ_k KL(π(·|x, y_<k) ‖ π_ref(·|x, y_<k))   the full-vocabulary KL at each position
                  (Rao-Blackwellised: the same expectation as `kl`, lower variance, never negative)
    distinct_n  = distinct n-grams of completion tokens / n-grams, over all completions (diversity)
    judge       = mean P(positive) under an independent classifier, over ALL completions (no −1 rule):
                  the "gold" reward of reward-overoptimisation studies, never trained against
    heldout_nll = mean negative log-likelihood per token of real held-out reviews (forgetting)

Sampling draws from one torch.Generator per batch, seeded from (`seed`, batch index): the same
seed, batch size and device give the same completions. Every model evaluated with the same seed
sees the same random numbers in every batch (common random numbers), so differences between
models, and between the η of a sweep, are less noisy than independent draws would make them. (One
generator for all batches would not do: a batch whose rows all end early draws fewer numbers, so
the next batch of a model that stops sooner would read another part of the stream.)
"""

import math

import numpy as np
import torch

from nanowarp import merging
from nanowarp.logger import completion_rows, progress
from nanowarp.data import load_reviews
from nanowarp.fast.logprobs import fused_sequence_kl, fused_token_logprobs
from nanowarp.logprobs import completion_hidden, final_softcap, sampled_kl
from nanowarp.reward import batch_columns, decode_texts
from nanowarp.sampling import first_eos, sample
from nanowarp.supervised import fit_review, perplexity, test_subset


def mean_and_se(values):
    """Mean and standard error of the mean of a 1-D tensor (se is None for a single value)."""
    values = values.double()
    n = values.numel()
    se = (values.std() / math.sqrt(n)).item() if n > 1 else None
    return values.mean().item(), se


def distinct_n(completions, n):
    """Distinct n-grams / n-grams over all completions (lists of token ids; n-grams never span two
    completions). 0.0 when there is no n-gram at all."""
    grams = [tuple(c[i:i + n]) for c in completions for i in range(len(c) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def heldout_sequences(data, n, tokenizer, n_positions, eos_id):
    """n test reviews, evenly spaced over the test split (both labels), each tokenized with the
    policy's tokenizer and cut to the context with EOS after it as the SFT model was trained
    (supervised.fit_review): the token-id lists evaluate(heldout=...) scores."""
    texts, _ = test_subset(*load_reviews(data, "test"), n)
    return [fit_review(e, text, n_positions, eos_id) for e, text in zip(tokenizer.encode_batch(texts), texts)]


def heldout_nll(policy, sequences, eos_id, batch_size=32):
    """Mean negative log-likelihood per token (nats) of `policy` on `sequences` (token-id lists, as
    heldout_sequences gives): each token after the first predicted from those before, EOS included.
    eos_id: an id or a list of them, as `evaluate` takes; the (masked) padding is the first."""
    return math.log(perplexity(policy, sequences, first_eos(eos_id), policy.lm_head.weight.device, batch_size))


def batch_seed(seed, batch):
    """The seed of batch `batch` of an evaluation with seed `seed`: distinct for every pair (SeedSequence)."""
    return int(np.random.SeedSequence([seed, batch]).generate_state(1, np.uint64)[0])


@torch.no_grad()
def evaluate(policy, ref, reward, prompts, tokenizer, eos_id, max_new_tokens=128, temperature=1.0,
             batch_size=64, seed=0, judge=None, heldout=None, samples=0, columns=None):
    """KL(π‖π_ref) and reward of `policy` on `prompts` (lists of token ids), one completion each.

    policy, ref: GPT2 or Llama models (same vocabulary; in eval mode if they have dropout); reward: nanowarp.reward.Reward
    (columns: the prompt rows' other fields, {name: list aligned with prompts}, for its functions);
    tokenizer: the policy's tokenizers.Tokenizer, to decode prompt + completion for the reward.
    judge: an optional second classifier (a RewardModel, e.g. of another architecture) scoring the
    same texts (prompt + completion), without the −1 rule; heldout: optional token-id lists (heldout_sequences) for heldout_nll.
    Returns dict(kl, reward, finished, length, n, kl_se, reward_se, kl_exact, kl_exact_se,
    distinct_1, distinct_2), plus judge, judge_se when a judge is given and heldout_nll when
    heldout is: means over prompts, finished = fraction that emitted EOS, length = mean
    completion tokens (EOS included), *_se = standard errors of the means, distinct_n over the
    completions' token ids up to EOS (EOS excluded; tokens, not words, so it does not depend on
    how a tokenizer decodes). With samples = K > 0, also `samples`: the first K (prompt,
    completion, reward, kl) rows.
    """
    device = policy.lm_head.weight.device
    ref_device = ref.lm_head.weight.device
    kls, kls_exact, rewards, judged, finished, lengths, completions, shown = [], [], [], [], [], [], [], []
    for start in progress(range(0, len(prompts), batch_size), "evaluating", unit="batch"):
        batch = prompts[start:start + batch_size]
        generator = torch.Generator(device).manual_seed(batch_seed(seed, start // batch_size))
        sampled = sample(policy, batch, max_new_tokens, eos_token_id=eos_id, temperature=temperature,
                         generator=generator)
        ref_tokens = sampled.tokens.to(ref_device)  # on the reference's device
        ref_hidden = completion_hidden(ref, sampled.prompt.to(ref_device), sampled.prompt_mask.to(ref_device),
                                       ref_tokens)
        ref_logprobs = fused_token_logprobs(ref_hidden, ref.lm_head.weight, ref_tokens, temperature,
                                      softcap=final_softcap(ref))
        mask = sampled.mask.to(ref_device)
        kls.append(sampled_kl(sampled.logprobs.to(ref_device), ref_logprobs, mask).cpu())
        # Σ_k KL(π(·|…) ‖ π_ref(·|…)) at the same positions, from one forward pass of the policy
        hidden = completion_hidden(policy, sampled.prompt, sampled.prompt_mask, sampled.tokens).to(ref_device)
        kls_exact.append(fused_sequence_kl(hidden, policy.lm_head.weight.to(ref_device), ref_hidden, ref.lm_head.weight,
                                     mask, temperature, softcap=final_softcap(policy),
                                     ref_softcap=final_softcap(ref)).cpu())
        n_tokens = sampled.mask.sum(1)
        texts = decode_texts(tokenizer, batch, sampled.tokens, n_tokens)
        rows = range(start, start + len(batch))
        rewards.append(reward.score(texts, sampled.finished, batch_columns(columns or {}, rows))[0])
        if judge is not None:
            judged.append(judge.score(texts.queries))
        finished.append(sampled.finished.cpu())
        lengths.append(n_tokens.cpu())
        if len(shown) < samples:
            k = min(samples - len(shown), len(batch))
            shown += completion_rows(tokenizer, batch[:k], sampled.tokens[:k], n_tokens[:k], rewards[-1][:k],
                                     kls[-1][:k], k)
        ends = (n_tokens - sampled.finished.long()).tolist()  # EOS excluded
        completions += [t[:n] for t, n in zip(sampled.tokens.tolist(), ends)]
    kl, kl_se = mean_and_se(torch.cat(kls))
    kl_exact, kl_exact_se = mean_and_se(torch.cat(kls_exact))
    reward, reward_se = mean_and_se(torch.cat(rewards))
    result = dict(kl=kl, reward=reward, finished=torch.cat(finished).double().mean().item(),
                  length=torch.cat(lengths).double().mean().item(), n=len(prompts), kl_se=kl_se, reward_se=reward_se,
                  kl_exact=kl_exact, kl_exact_se=kl_exact_se,
                  distinct_1=distinct_n(completions, 1), distinct_2=distinct_n(completions, 2))
    if judge is not None:
        result["judge"], result["judge_se"] = mean_and_se(torch.cat(judged))
    if heldout is not None:
        result["heldout_nll"] = heldout_nll(policy, heldout, eos_id)
    if samples:
        result["samples"] = shown
    return result


def best_of_n_kl(n):
    """KL(best-of-n of π ‖ π) = log n − (n − 1)/n: the analytic value that the RLHF literature plots
    best-of-n at (Stiennon et al. 2020, Gao et al. 2022); exact when no two completions of a prompt
    tie in reward, an upper bound otherwise (Beirami et al. 2024)."""
    return math.log(n) - (n - 1) / n


@torch.no_grad()
def best_of_n(ref, reward, prompts, tokenizer, eos_id, ns, max_new_tokens=128, temperature=1.0, batch_size=64,
              seed=0, judge=None, columns=None):
    """Best-of-n of `ref` for each n in `ns`: n completions per prompt sampled from `ref`, the reward
    (a nanowarp.reward.Reward) keeps the one it scores highest (ties: the first drawn). This is the reference front of
    RLHF papers: how much reward a KL budget buys with no training at all.

    The completions are drawn once, max(ns) per prompt, and best-of-n uses the first n of them, so
    the rows are nested and the reward never decreases with n. Batch b draws them one after another
    from one generator seeded as evaluate() seeds batch b: draw 0 is the completion evaluate(ref, ...)
    samples with the same seed, so best-of-1 is the reference's own row.
    Returns one dict per n, in ascending order: best_of, kl (best_of_n_kl), reward, reward_se,
    finished, length, distinct_1, distinct_2, n (prompts), and judge, judge_se (the judge's
    P(positive) of the kept completions) when a judge is given. Best-of-n has no exact KL along its
    completions to report: it is not an autoregressive policy."""
    ns = sorted(set(ns))
    if not ns or ns[0] < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {ns}")
    device = ref.lm_head.weight.device
    kept = {n: dict(rewards=[], judged=[], finished=[], lengths=[], completions=[]) for n in ns}
    for start in progress(range(0, len(prompts), batch_size), f"best-of-{ns[-1]}", unit="batch"):
        batch = prompts[start:start + batch_size]
        generator = torch.Generator(device).manual_seed(batch_seed(seed, start // batch_size))
        draws = []  # per draw: (texts, rewards (B,), finished (B,), n_tokens (B,), completions)
        for _ in range(ns[-1]):
            sampled = sample(ref, batch, max_new_tokens, eos_token_id=eos_id, temperature=temperature,
                             generator=generator)
            n_tokens = sampled.mask.sum(1).cpu()
            finished = sampled.finished.cpu()
            texts = decode_texts(tokenizer, batch, sampled.tokens, n_tokens)
            ends = (n_tokens - finished.long()).tolist()  # EOS excluded
            scored, _ = reward.score(texts, finished, batch_columns(columns or {}, range(start, start + len(batch))))
            draws.append((texts.queries, scored, finished, n_tokens, [t[:m] for t, m in zip(sampled.tokens.tolist(), ends)]))
        rewards = torch.stack([d[1] for d in draws])  # (max n, B)
        picks = {n: rewards[:n].argmax(0).tolist() for n in ns}  # argmax returns the first of equal maxima
        if judge is not None:  # the judge scores each kept completion once, however many n keep it
            chosen = sorted({(j, b) for n in ns for b, j in enumerate(picks[n])})
            scores = dict(zip(chosen, judge.score([draws[j][0][b] for j, b in chosen]).tolist()))
        for n in ns:
            rows = list(enumerate(picks[n]))
            k = kept[n]
            k["rewards"] += [draws[j][1][b].item() for b, j in rows]
            k["finished"] += [draws[j][2][b].item() for b, j in rows]
            k["lengths"] += [draws[j][3][b].item() for b, j in rows]
            k["completions"] += [draws[j][4][b] for b, j in rows]
            if judge is not None:
                k["judged"] += [scores[(j, b)] for b, j in rows]
    results = []
    for n in ns:
        k = kept[n]
        reward, reward_se = mean_and_se(torch.tensor(k["rewards"]))
        result = dict(best_of=n, kl=best_of_n_kl(n), reward=reward, reward_se=reward_se,
                      finished=float(np.mean(k["finished"])), length=float(np.mean(k["lengths"])), n=len(prompts),
                      distinct_1=distinct_n(k["completions"], 1), distinct_2=distinct_n(k["completions"], 2))
        if judge is not None:
            result["judge"], result["judge_se"] = mean_and_se(torch.tensor(k["judged"]))
        results.append(result)
    return results


def liti_sweep(theta_a, theta_b, etas, policy, ref, reward, prompts, tokenizer, eos_id, log=None, **kwargs):
    """evaluate() of (1−η)·θ_a + η·θ_b for each η in etas, without writing any checkpoint.

    theta_a, theta_b: dense state dicts in the Hugging Face layout (model.hf_state_dict()).
    policy: a model of their architecture whose weights are overwritten for each η (one model in
    memory, whatever the number of points); not the model theta_a or theta_b are views of.
    kwargs go to evaluate() (judge and heldout included); log(eta, result), if given, is called
    after each point.
    Returns a list of evaluate() dicts, each with its `eta`.
    """
    merging.check_compatible([theta_a, theta_b], ["sweep start", "sweep end"])
    results = []
    for eta in progress(etas, "LITI sweep", unit="point"):
        policy.load_hf_state_dict(merging.liti(theta_a, theta_b, eta), where=f"LITI eta={eta}")
        result = dict(eta=eta, **evaluate(policy, ref, reward, prompts, tokenizer, eos_id, **kwargs))
        if log is not None:
            log(eta, result)
        results.append(result)
    return results

