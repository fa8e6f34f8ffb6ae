"""
Log-probabilities of completions, the quantities the RL loss and the KL penalty are made of
(Algorithm 1 of Ramé et al. 2024, lines 6–8):

    log π(y_k | x, y_<k) = log softmax(h_k · Wᵀ / τ)[y_k]        h_k: the hidden state before y_k, W: the LM head
    KL estimate of a completion y ~ π:  Σ_k log π(y_k | x, y_<k) − log π_ref(y_k | x, y_<k)

`token_logprobs` and `sequence_kl` write the computations plainly, holding the (B, T, V) logits:
the tests' reference. The RL run and the evaluation call the fused versions of nanowarp/fast/logprobs.py,
which never hold them (0.64x the time and 3% of the extra memory for 64 completions of 148 tokens).
"""

import torch

from nanowarp.fast.logprobs import fused_token_logprobs


def logits(hidden, weight, temperature=1.0, softcap=None):
    """z = h·Wᵀ / τ (B, T, V) in the inputs' dtype; with Gemma 2's final soft cap c, c·tanh(h·Wᵀ / c) / τ."""
    z = hidden @ weight.t()
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return z / temperature


def token_logprobs(hidden, weight, targets, temperature=1.0, softcap=None):
    """log softmax(h·Wᵀ / τ)[targets], plainly: hidden (B, T, d), weight (V, d), targets (B, T) -> (B, T)."""
    z = logits(hidden, weight, temperature, softcap)
    return torch.log_softmax(z, -1).gather(-1, targets[..., None]).squeeze(-1)


def sequence_kl(hidden, weight, ref_hidden, ref_weight, mask, temperature=1.0, softcap=None, ref_softcap=None):
    """Σ_k KL(π(·|x, y_<k) ‖ π_ref(·|x, y_<k)) over each sequence's masked positions, plainly: the
    full-vocabulary KL, Σ_v p_v (log p_v − log q_v), at every position. (B,)"""
    logp = torch.log_softmax(logits(hidden, weight, temperature, softcap), -1)
    logq = torch.log_softmax(logits(ref_hidden, ref_weight, temperature, ref_softcap), -1)
    return ((logp.exp() * (logp - logq)).sum(-1) * mask).sum(1)


def completion_hidden(model, prompt_ids, prompt_mask, tokens):
    """Hidden states (B, N, d) at the positions that predict the completion tokens (B, N)."""
    idx = torch.cat([prompt_ids, tokens], 1)[:, :-1]  # the last token predicts nothing we need
    mask = torch.cat([prompt_mask, torch.ones_like(tokens)], 1)[:, :-1]
    return model.hidden_states(idx, mask)[:, prompt_ids.size(1) - 1:]


def completion_logprobs(model, prompt_ids, prompt_mask, tokens, temperature):
    """log π(y_k | x, y_<k) of the completion tokens (B, N) under `model` (GPT2 or Llama): token_logprobs
    of the completion's hidden states, through the fused log-prob."""
    h = completion_hidden(model, prompt_ids, prompt_mask, tokens)
    return fused_token_logprobs(h, model.lm_head.weight, tokens, temperature, softcap=final_softcap(model))


def final_softcap(model):
    """Gemma 2's final soft cap c (logits -> c·tanh(logits / c)); None for the other models."""
    return getattr(model.config, "final_logit_softcapping", None)


def sampled_kl(logprobs, ref_logprobs, mask):
    """Σ_k [log π(y_k|x, y_<k) − log π_ref(y_k|x, y_<k)] over each completion's masked tokens (mask (B, N):
    up to and including EOS): for y ~ π, the single-sample estimate of the sequence KL(π‖π_ref). (B,)"""
    return ((logprobs - ref_logprobs) * mask).sum(1)
