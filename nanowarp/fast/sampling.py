"""
Drawing one token per row by inverse CDF: uniform random numbers, running sums of the probabilities
and binary searches, no device sync. Plainly: `torch.multinomial(weights, 1)` (sampling.multinomial,
the tests' reference distribution), which on a CPU runs the exponential race argmax(p / Exp(1)): B×V
random numbers, 84 ms of a GPT-2 decoding step of 64 rows where this takes 8 ms (docs/performance.md).
"""

import torch


def inverse_cdf(weights, generator=None, block=1024, rows=None):
    """One index per row of weights (B, V) >= 0, drawn with probability proportional to its weight.

    Inverse CDF in two levels: a block of `block` indices, from the running sum of the blocks'
    weights, then an index within it, from the running sum inside the block. Each running sum
    adds a few dozen or a thousand numbers, so fp32 keeps every share exact to ~1e-7 of its block
    and nothing of size (B, V) is allocated. One fp32 cumsum over 50257 tokens would shift each
    token's share by up to 6e-8 absolute, the whole probability of a rare token (a total variation
    of ~3e-4 per draw); an fp64 one, with its (B, V) fp64 buffers, made a whole sampling step
    several times slower on a CPU. A zero weight is never drawn.

    rows = (start, total): these B rows are rows start..start+B-1 of a batch of `total`; the random
    numbers of the whole batch are drawn and these rows' used, so that a batch sampled a piece
    at a time gets the tokens of the whole batch (see sample_micro_batches).
    """
    B, V = weights.shape
    if rows is None:
        u = 1.0 - torch.rand(B, 2, generator=generator, device=weights.device)  # in (0, 1]
    else:
        start, total = rows
        u = 1.0 - torch.rand(total, 2, generator=generator, device=weights.device)[start:start + B]
    n_full = V // block
    block_weight = weights[:, :n_full * block].unflatten(1, (n_full, block)).sum(-1)  # (B, n_full)
    if V % block:  # the last, shorter block
        block_weight = torch.cat([block_weight, weights[:, n_full * block:].sum(-1, keepdim=True)], dim=1)
    b = _first_reaching(block_weight.cumsum(-1), u[:, :1])  # (B, 1), the block
    idx = b * block + torch.arange(block, device=weights.device)  # (B, block), its indices
    within = weights.gather(1, idx.clamp(max=V - 1)) * (idx < V)  # (B, block), 0 past the end
    return (b * block + _first_reaching(within.cumsum(-1), u[:, 1:])).squeeze(1)


def _first_reaching(cdf, u):
    """Per row of cdf (B, n), a running sum of weights, the first index where it reaches u times
    the total, u (B, 1) in (0, 1]: index i is drawn with probability weight_i / total, and an
    index of weight 0 never (the sum only reaches a new value at an index that adds weight)."""
    return torch.searchsorted(cdf, u * cdf[:, -1:])
