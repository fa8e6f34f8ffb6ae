"""
The fused log-prob: log softmax(h·Wᵀ / τ)[target] straight from hidden states, without ever holding
the (B, T, V) logits; nanowarp/logprobs.py's `token_logprobs` (log_softmax + gather) is the same
computation written plainly, and the tests' reference. Also the fused full-vocabulary KL
(`fused_sequence_kl`, plainly logprobs.sequence_kl), for the evaluation.

References: the "fused linear cross-entropy" of Liger-Kernel and Apple's Cut Cross-Entropy
(Wijmans et al. 2024), which make the same observation for the language-modelling loss.

Why: for 64 completions of 148 tokens and GPT-2's V = 50257 the logits alone take 1.9 GB in
fp32, and `log_softmax` + `gather` + backward keep up to three tensors of that size alive. Here the
N = B·T tokens go through in chunks of `chunk_size`; one (chunk_size, V) block exists at a time.
Arithmetic is fp32 whatever the input dtype (bf16 inputs are upcast, the weight once per call).

Gradients. With z = h·Wᵀ/τ, p = softmax(z) and ℓ = z_t − logsumexp(z), for one token:

    ∂ℓ/∂h = (W_t − pᵀW) / τ        a d-vector, the same whatever the upstream gradient g
    ∂ℓ/∂W = (e_t − p) hᵀ / τ       a (V, d) matrix, summed over tokens weighted by g

Gradient to hidden only (WARP with LoRA: the tied LM head is frozen): the forward pass computes
∂ℓ/∂h for each chunk while the chunk's softmax is at hand (one more (n, V)·(V, d) matmul) and
keeps it, (N, d) like `hidden`; the backward is g·(that). Two matmuls of the size of the logits,
as many as naive log_softmax + gather, and far fewer passes over memory.

Gradient to the weight too: it cannot be prepared without g, so the forward keeps only each
token's logsumexp (a running max and sum over tiles of (chunk, V / VOCAB_BLOCKS) logits), and
the backward recomputes the softmax, tile by tile, and takes both gradients from it. The peak is
then the gradients themselves plus one tile (an eighth of a chunk; every tile reuses one buffer).
Four matmuls of the size of the logits against naive's three; what naive spends on passes over
its (N, V) tensors pays for the fourth on a CPU.

Gemma 2's final soft cap (`softcap` c): z = c·tanh(h·Wᵀ / c) / τ. Each logit's derivative gains
the factor s = 1 − tanh²(h·W_vᵀ / c) = 1 − (τz / c)², so W_t becomes s_t W_t, p becomes p ∘ s
in pᵀW, and (e_t − p) becomes (e_t − p) ∘ s in ∂ℓ/∂W.

Measured on a 2-core CPU for 64 x 148 tokens (bench/logprobs.py; the table is in docs/performance.md#fused-log-prob):
gradient to hidden, 0.64x naive's time and 3.3% of its extra peak memory; to hidden and weight,
0.94x and 4.2% (of which 3.2% is the two gradients themselves).
"""

import torch

# default chunk: as many tokens as make a 128 MiB fp32 block of logits (667 tokens for GPT-2).
# Smaller chunks run the (n, d)·(d, V) matmuls less efficiently on a 2-core CPU; larger ones cost
# memory and gain little.
CHUNK_BYTES = 128 * 2**20
# without the hidden-only shortcut (no gradient, or the weight's), logits are formed in tiles of
# (chunk, V / VOCAB_BLOCKS): an eighth of a chunk's memory; (667, 6283) tiles keep the matmuls fast
VOCAB_BLOCKS = 8


def fused_token_logprobs(hidden, weight, targets, temperature=1.0, chunk_size=None, softcap=None):
    """log softmax(hidden · weightᵀ / temperature)[targets], computed chunk by chunk.

    hidden (B, T, d), weight (V, d) (the LM head, `model.lm_head.weight`), targets (B, T) int64
    in [0, V). Returns (B, T) float32. Differentiable in hidden and weight. Every target must be
    a real token id: mask padding in the result, after replacing its target by any valid id.
    softcap: the model's final soft cap (logprobs.final_softcap(model)), None for none.
    """
    assert hidden.shape[:-1] == targets.shape and hidden.size(-1) == weight.size(1), \
        f"shapes: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, targets {tuple(targets.shape)}"
    chunk_size = chunk_size or max(1, CHUNK_BYTES // (4 * weight.size(0)))
    h, t = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        out = TokenLogprobs.apply(h, weight, t, temperature, chunk_size, softcap)
    else:
        out = _forward(h, weight, t, temperature, chunk_size, False, softcap)[0]
    return out.view(targets.shape)


def _logits(h, w, temperature, buffer=None, softcap=None):
    """h (n, d), w (V, d) -> z = h·wᵀ / τ (n, V) in fp32, or c·tanh(h·wᵀ / c) / τ with softcap c;
    written into the front of the flat fp32 `buffer` when given (one buffer for every tile spares
    the allocator a block per tile)."""
    out = None if buffer is None else buffer[:h.size(0) * w.size(0)].view(h.size(0), w.size(0))
    if softcap is None:
        return torch.mm(h.float() / temperature, w.t(), out=out)
    return torch.mm(h.float(), w.t(), out=out).div_(softcap).tanh_().mul_(softcap / temperature)


def _target_logits(h, w, t, temperature, softcap=None):
    """The targets' logits z_t (n,), as _logits computes them (one dot product per token)."""
    u = (h.float() * w[t]).sum(-1)
    return u / temperature if softcap is None else torch.tanh(u / softcap) * (softcap / temperature)


def _slope(z, temperature, softcap):
    """s = ∂(c·tanh(u / c))/∂u = 1 − (τz / c)², of the capped logits z (see the module docstring)."""
    return 1 - (z * (temperature / softcap)) ** 2


def _tile_buffer(chunk_size, V, device):
    """A flat fp32 buffer that holds a tile of (chunk_size, V / VOCAB_BLOCKS) logits."""
    return torch.empty(chunk_size * -(-V // VOCAB_BLOCKS), dtype=torch.float32, device=device)


def _vocab_tiles(V):
    """VOCAB_BLOCKS slices of the vocabulary 0..V-1, the last one possibly shorter."""
    block = -(-V // VOCAB_BLOCKS)
    return [slice(v, v + block) for v in range(0, V, block)]


def _chunk_with_grad_hidden(h, w, t, temperature, softcap=None):
    """One chunk of n tokens, its whole (n, V) softmax at once: log-probs (n,), logsumexp (n,)
    and ∂logprob/∂h (n, d). A function of its own so that its block is freed before the next's."""
    z = _logits(h, w, temperature, softcap=softcap)  # (n, V)
    z_t = z.gather(1, t[:, None]).squeeze(1)
    slope = None if softcap is None else _slope(z, temperature, softcap)  # (n, V)
    m = z.amax(-1, keepdim=True)
    e = z.sub_(m).exp_()  # in place: z itself is no longer needed
    total = e.sum(-1, keepdim=True)
    lse = (m + total.log()).squeeze(1)  # logsumexp(z)
    p = e.div_(total)  # softmax, in place
    if slope is None:
        grad_hidden = (w[t] - p @ w) / temperature  # ∂ℓ/∂h = (W_t − pᵀW) / τ
    else:  # ∂ℓ/∂h = (s_t W_t − (p ∘ s)ᵀW) / τ
        grad_hidden = (slope.gather(1, t[:, None]) * w[t] - p.mul_(slope) @ w) / temperature
    return z_t - lse, lse, grad_hidden


def _chunk_logprobs(h, w, t, temperature, buffer, softcap=None):
    """One chunk of n tokens: log-probs (n,) and logsumexp (n,), one (n, V / VOCAB_BLOCKS) tile
    of logits at a time, with a running maximum and sum (as flash attention does)."""
    z_t = _target_logits(h, w, t, temperature, softcap)
    m = torch.full_like(z_t, -float("inf"))
    total = torch.zeros_like(z_t)
    for cols in _vocab_tiles(w.size(0)):
        z = _logits(h, w[cols], temperature, buffer, softcap)
        m_new = torch.maximum(m, z.amax(-1))
        total = total * (m - m_new).exp() + z.sub_(m_new[:, None]).exp_().sum(-1)
        m = m_new
    lse = m + total.log()
    return z_t - lse, lse


def _forward(hidden, weight, targets, temperature, chunk_size, with_grad_hidden, softcap=None):
    """Log-probs (N,), logsumexp (N,) and, if asked, ∂logprob/∂hidden (N, d), all fp32."""
    N, d = hidden.shape
    w = weight.float()
    logprobs = torch.empty(N, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty(N, d, dtype=torch.float32, device=hidden.device) if with_grad_hidden else None
    buffer = None if with_grad_hidden else _tile_buffer(min(chunk_size, N), w.size(0), hidden.device)
    for s in range(0, N, chunk_size):
        chunk = slice(s, s + chunk_size)
        if with_grad_hidden:
            logprobs[chunk], lse[chunk], grad_hidden[chunk] = _chunk_with_grad_hidden(
                hidden[chunk], w, targets[chunk], temperature, softcap)
        else:
            logprobs[chunk], lse[chunk] = _chunk_logprobs(hidden[chunk], w, targets[chunk], temperature, buffer,
                                                          softcap)
    return logprobs, lse, grad_hidden


def _grads_from_softmax(hidden, weight, targets, lse, g, temperature, chunk_size, need_hidden, softcap=None):
    """∂/∂weight of Σ g_i ℓ_i and, if asked, ∂/∂hidden: with a_i = g_i / τ,

        ∂/∂W = Σ_i a_i (e_{t_i} − p_i) h_iᵀ,      ∂/∂h_i = a_i (W_{t_i} − p_iᵀ W),

    the softmax p recomputed from the saved logsumexp, one (chunk, V / VOCAB_BLOCKS) tile at a time
    (with a soft cap, times the slopes s: see the module docstring)."""
    (N, d), V = hidden.shape, weight.size(0)
    w = weight.float()
    dw = torch.zeros_like(w)
    dh = torch.empty(N, d, dtype=torch.float32, device=hidden.device) if need_hidden else None
    buffer = _tile_buffer(min(chunk_size, N), V, hidden.device)
    for s in range(0, N, chunk_size):
        rows = slice(s, s + chunk_size)
        h, t, a = hidden[rows].float(), targets[rows], g[rows] / temperature
        ha = h * a[:, None]  # (n, d)
        s_t = None if softcap is None else _slope(_target_logits(h, w, t, temperature, softcap), temperature, softcap)
        dw.index_add_(0, t, ha if s_t is None else ha * s_t[:, None])  # the e_t part
        pw = torch.zeros_like(h) if need_hidden else None  # Σ_v p_v W_v, (n, d)
        for cols in _vocab_tiles(V):
            z = _logits(h, w[cols], temperature, buffer, softcap)
            slope = None if softcap is None else _slope(z, temperature, softcap)
            p = z.sub_(lse[rows, None]).exp_()  # (n, block) of softmax
            if slope is not None:
                p.mul_(slope)
            dw[cols].addmm_(p.t(), ha, alpha=-1.0)
            if need_hidden:
                pw.addmm_(p, w[cols])
        if need_hidden:
            dh[rows] = a[:, None] * ((w[t] if s_t is None else s_t[:, None] * w[t]) - pw)
    return dh, dw


class TokenLogprobs(torch.autograd.Function):
    """hidden (N, d), weight (V, d), targets (N,) -> log-probs (N,); see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, softcap=None):
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        # with the weight's gradient, the backward forms the hidden's from the same recomputed softmax
        logprobs, lse, grad_hidden = _forward(hidden, weight, targets, temperature, chunk_size,
                                              with_grad_hidden=need_hidden and not need_weight, softcap=softcap)
        ctx.save_for_backward(hidden, weight, targets, lse, grad_hidden)
        ctx.temperature, ctx.chunk_size, ctx.softcap = temperature, chunk_size, softcap
        return logprobs

    @staticmethod
    def backward(ctx, g):
        hidden, weight, targets, lse, grad_hidden = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        g = g.float()
        if not need_weight:
            return (g[:, None] * grad_hidden).to(hidden.dtype), None, None, None, None, None
        dh, dw = _grads_from_softmax(hidden, weight, targets, lse, g, ctx.temperature, ctx.chunk_size, need_hidden,
                                     ctx.softcap)
        return (dh.to(hidden.dtype) if need_hidden else None), dw.to(weight.dtype), None, None, None, None


@torch.no_grad()
def fused_sequence_kl(hidden, weight, ref_hidden, ref_weight, mask, temperature=1.0, chunk_size=None, softcap=None,
                ref_softcap=None):
    """Σ_k KL(π(·|x, y_<k) ‖ π_ref(·|x, y_<k)) of each sequence: the full-vocabulary KL at every
    masked position, summed. With z = h·Wᵀ/τ (the policy's logits), u = h_ref·W_refᵀ/τ (the
    reference's) and p = softmax(z), one position's KL is

        KL = Σ_v p_v (z_v − u_v) − logsumexp(z) + logsumexp(u)

    computed like fused_token_logprobs: the masked positions in chunks of `chunk_size`, each over
    (chunk, V / VOCAB_BLOCKS) tiles of both logits, with running maxima and sums (the Σ_v p_v (z_v −
    u_v) term rescaled like the softmax's sum). Never holds (B, T, V).

    Summed along sampled prefixes y ~ π this is the Rao-Blackwellised form of the sampled estimate
    Σ_k log π(y_k|…) − log π_ref(y_k|…): the same expectation, lower variance, and never negative.

    hidden, ref_hidden (B, T, d) and (B, T, d_ref): hidden states at the positions that predict the
    completion tokens; weight (V, d), ref_weight (V, d_ref): the LM heads (one vocabulary); mask (B, T)
    1 for the tokens to count (up to and including EOS); softcap, ref_softcap: the models' final
    soft caps (final_softcap). Returns (B,) float32. No gradient.
    """
    assert hidden.shape[:-1] == ref_hidden.shape[:-1] == mask.shape and weight.size(0) == ref_weight.size(0), \
        f"shapes: hidden {tuple(hidden.shape)}, ref_hidden {tuple(ref_hidden.shape)}, weight " \
        f"{tuple(weight.shape)}, ref_weight {tuple(ref_weight.shape)}, mask {tuple(mask.shape)}"
    V = weight.size(0)
    chunk_size = chunk_size or max(1, CHUNK_BYTES // (4 * V))
    rows = mask.reshape(-1).nonzero().squeeze(1)  # only the counted positions are computed
    h, h_ref = hidden.reshape(-1, hidden.size(-1))[rows], ref_hidden.reshape(-1, ref_hidden.size(-1))[rows]
    w, w_ref = weight.float(), ref_weight.float()
    kl = torch.empty(rows.numel(), dtype=torch.float32, device=hidden.device)
    n = min(chunk_size, max(1, rows.numel()))
    buffers = _tile_buffer(n, V, hidden.device), _tile_buffer(n, V, hidden.device)
    for s in range(0, rows.numel(), chunk_size):
        chunk = slice(s, s + chunk_size)
        kl[chunk] = _chunk_kl(h[chunk], w, h_ref[chunk], w_ref, temperature, buffers, softcap, ref_softcap)
    per_sequence = torch.zeros(mask.numel(), dtype=torch.float32, device=hidden.device)
    per_sequence[rows] = kl.clamp_(min=0)  # ≥ 0 exactly; rounding can leave −1e-7 where π = π_ref
    return per_sequence.view(mask.shape).sum(1)


def _chunk_kl(h, w, h_ref, w_ref, temperature, buffers, softcap=None, ref_softcap=None):
    """One chunk of n positions: KL(softmax(z) ‖ softmax(u)) (n,), tile by tile over the vocabulary.

    In the shifted form KL = Σ_v p_v ((z_v − m) − (u_v − m_ref)) − log Σ_v e^(z_v − m) + log Σ_v e^(u_v − m_ref)
    (m, m_ref the maxima of z and u): the terms stay small where both models are confident about
    the same token, so fp32 does not cancel two large numbers."""
    m = torch.full((h.size(0),), -float("inf"), device=h.device)  # running max of z
    total = torch.zeros_like(m)  # Σ exp(z − m)
    weighted = torch.zeros_like(m)  # Σ exp(z − m)((z − m) − (u − m_ref))
    m_ref, total_ref = m.clone(), total.clone()  # the same for u
    for cols in _vocab_tiles(w.size(0)):
        z = _logits(h, w[cols], temperature, buffers[0], softcap)
        u = _logits(h_ref, w_ref[cols], temperature, buffers[1], ref_softcap)
        m_new, m_ref_new = torch.maximum(m, z.amax(-1)), torch.maximum(m_ref, u.amax(-1))
        scale = (m - m_new).exp()
        # re-shift what is summed so far: each earlier term gains (m − m_new) − (m_ref − m_ref_new)
        shift = torch.where(total > 0, (m - m_new) - (m_ref - m_ref_new), 0.0)
        z.sub_(m_new[:, None])
        u.sub_(m_ref_new[:, None])
        diff = z - u  # (n, block)
        e = z.exp_()  # exp(z − m), in place
        weighted = (weighted + total * shift) * scale + diff.mul_(e).sum(-1)
        total = total * scale + e.sum(-1)
        total_ref = total_ref * (m_ref - m_ref_new).exp() + u.exp_().sum(-1)
        m, m_ref = m_new, m_ref_new
    return weighted / total - total.log() + total_ref.log()
