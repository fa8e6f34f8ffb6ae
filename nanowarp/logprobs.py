"""
Log-probabilities of given tokens straight from hidden states, log softmax(h·Wᵀ / τ)[target],
without ever holding the (B, T, V) logits.

References: the "fused linear cross-entropy" of Liger-Kernel and Apple's Cut Cross-Entropy
(Wijmans et al. 2024), which make the same observation for the language-modelling loss.

Why: for 64 completions of 148 tokens and GPT-2's V = 50257 the logits alone take 1.9 GB in
fp32, and `log_softmax` + `gather` + backward keep up to three tensors of that size alive. Here the
N = B·T tokens go through in chunks of `chunk_size`; one (chunk_size, V) block exists at a time.
Arithmetic is fp32 whatever the input dtype (bf16 inputs are upcast, the weight once per call).

Gradients. With z = h·Wᵀ/τ, p = softmax(z) and ℓ = z_t − logsumexp(z), for one token:

    ∂ℓ/∂h = (W_t − pᵀW) / τ        a d-vector, the same whatever the upstream gradient g
    ∂ℓ/∂W = (e_t − p) hᵀ / τ       a (V, d) matrix, summed over tokens weighted by g

So the forward pass computes ∂ℓ/∂h for each chunk while the chunk's softmax is at hand (one more
(n, V)·(V, d) matmul) and keeps it, (N, d) like `hidden`; the backward is g·(that). The weight
gradient cannot be prepared without g, so the backward recomputes each chunk's softmax for it;
that happens only when `weight` requires grad (with LoRA the tied LM head is frozen).
In matmuls of the size of the logits: naive log_softmax + gather costs 2 (forward, gradient of
hidden), or 3 with a weight gradient; this costs 2, or 4 with a weight gradient. Measured on a
2-core CPU for 64 x 148 tokens (bench/logprobs.py): gradient to hidden only, 0.8x the time of
naive and 3% of its extra peak memory (182 MiB vs 5.3 GiB); with the weight gradient too, 1.25x
the time and 6.5% of the memory, of which 147 MiB is the weight gradient itself.
"""

import torch

# default chunk: as many tokens as make a 128 MiB fp32 block of logits (667 tokens for GPT-2).
# Smaller chunks run the (n, d)·(d, V) matmuls less efficiently on a 2-core CPU; larger ones cost
# memory and gain little.
CHUNK_BYTES = 128 * 2**20


def token_logprobs(hidden, weight, targets, temperature=1.0, chunk_size=None):
    """log softmax(hidden · weightᵀ / temperature)[targets], computed chunk by chunk.

    hidden (B, T, d), weight (V, d) (the LM head, `model.lm_head.weight`), targets (B, T) int64
    in [0, V). Returns (B, T) float32. Differentiable in hidden and weight. Every target must be
    a real token id: mask padding in the result, after replacing its target by any valid id.
    """
    assert hidden.shape[:-1] == targets.shape and hidden.size(-1) == weight.size(1), \
        f"shapes: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, targets {tuple(targets.shape)}"
    chunk_size = chunk_size or max(1, CHUNK_BYTES // (4 * weight.size(0)))
    h, t = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        out = TokenLogprobs.apply(h, weight, t, temperature, chunk_size)
    else:
        out = _forward(h, weight, t, temperature, chunk_size, False)[0]
    return out.view(targets.shape)


def _logits(h, w, temperature):
    """h (n, d), w (V, d) -> z = h·wᵀ / τ (n, V) in fp32."""
    return torch.mm(h.float() / temperature, w.t())


def _forward_chunk(h, w, t, temperature, with_grad_hidden):
    """One chunk of n tokens: log-probs (n,), logsumexp (n,), ∂logprob/∂h (n, d) or None.
    A function of its own so that its (n, V) block is freed before the next chunk's exists."""
    z = _logits(h, w, temperature)  # (n, V)
    z_t = z.gather(1, t[:, None]).squeeze(1)
    m = z.amax(-1, keepdim=True)
    e = z.sub_(m).exp_()  # in place: z itself is no longer needed
    total = e.sum(-1, keepdim=True)
    lse = (m + total.log()).squeeze(1)  # logsumexp(z)
    grad_hidden = None
    if with_grad_hidden:
        p = e.div_(total)  # softmax, in place
        grad_hidden = (w[t] - p @ w) / temperature  # ∂ℓ/∂h = (W_t − pᵀW) / τ
    return z_t - lse, lse, grad_hidden


def _forward(hidden, weight, targets, temperature, chunk_size, with_grad_hidden):
    """Log-probs (N,), logsumexp (N,) and, if asked, ∂logprob/∂hidden (N, d), all fp32."""
    N, d = hidden.shape
    w = weight.float()
    logprobs = torch.empty(N, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty(N, d, dtype=torch.float32, device=hidden.device) if with_grad_hidden else None
    for s in range(0, N, chunk_size):
        chunk = slice(s, s + chunk_size)
        logprobs[chunk], lse[chunk], g = _forward_chunk(hidden[chunk], w, targets[chunk], temperature,
                                                        with_grad_hidden)
        if with_grad_hidden:
            grad_hidden[chunk] = g
    return logprobs, lse, grad_hidden


def _accumulate_weight_grad(dw, h, w, t, lse, g, temperature):
    """dw += Σ_i (g_i / τ) (e_{t_i} − p_i) h_iᵀ over one chunk, recomputing its softmax p."""
    hg = h.float() * (g / temperature)[:, None]  # (n, d)
    dw.index_add_(0, t, hg)  # the e_t part
    p = _logits(h, w, temperature).sub_(lse[:, None]).exp_()  # (n, V): p = exp(z − logsumexp z)
    dw.addmm_(p.t(), hg, alpha=-1.0)  # − Σ p_i (g_i h_i / τ)ᵀ


class TokenLogprobs(torch.autograd.Function):
    """hidden (N, d), weight (V, d), targets (N,) -> log-probs (N,); see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size):
        logprobs, lse, grad_hidden = _forward(hidden, weight, targets, temperature, chunk_size,
                                              with_grad_hidden=ctx.needs_input_grad[0])
        ctx.save_for_backward(hidden, weight, targets, lse, grad_hidden)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return logprobs

    @staticmethod
    def backward(ctx, g):
        hidden, weight, targets, lse, grad_hidden = ctx.saved_tensors
        temperature, chunk_size = ctx.temperature, ctx.chunk_size
        g = g.float()
        dh = dw = None
        if ctx.needs_input_grad[0]:
            dh = (g[:, None] * grad_hidden).to(hidden.dtype)
        if ctx.needs_input_grad[1]:
            w = weight.float()
            dw = torch.zeros_like(w)
            for s in range(0, hidden.size(0), chunk_size):
                chunk = slice(s, s + chunk_size)
                _accumulate_weight_grad(dw, hidden[chunk], w, targets[chunk], lse[chunk], g[chunk], temperature)
            dw = dw.to(weight.dtype)
        return dh, dw, None, None, None
