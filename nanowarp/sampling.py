"""
Sampling completions from GPT-2 with a static KV cache, in the style of gpt-fast's generate.py.

References:
1) gpt-fast (github.com/pytorch-labs/gpt-fast), generate.py: `prefill`, `decode_one_token`,
   `decode_n_tokens` over a preallocated cache, sampling without a device sync
2) Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration" (top-p / nucleus)

Layout of a batch. Prompts of different lengths are left-padded to the longest, P, so that every
row's last prompt token sits in slot P-1 and all rows write their i-th new token to slot P+i:

    slot         0    1    2    3  |  4    5    6   ...  P+N-1
    row 0       pad  pad   a    b  |  y0   y1   y2
    row 1        c    d    e    f  |  y0   y1   y2
    mask row 0   0    0    1    1  |  1    1    1

The attention mask (B, P + max_new_tokens) is built once, with every generated slot set to 1, and
step i passes its first P + i + 1 columns: attention then reads only the cache slots written so
far. (A compiled step passes all of it, for fixed shapes: causal masking hides the later slots.)
Positions count from each row's first real token (see gpt2.py), so a padded row computes what it
would alone. A row that sampled EOS keeps being computed (static shapes) but what it emits after
is replaced by the pad id, masked out and given log-prob 0.

Sampling draws from softmax(logits / temperature) by inverse CDF: uniform random numbers, running
sums of the probabilities and binary searches (`inverse_cdf`), no device sync. `torch.multinomial`
over a (64, 50257) table costs as much as the LM head on a CPU: there it runs the exponential
race argmax(p / Exp(1)), which needs B×V random numbers, ~10x the cost of a running sum.

Returned log-probs are those of the sampled tokens under softmax(logits / temperature), the
distribution the RL loss and the KL penalty use, so the RL loop need not recompute the behaviour
policy. With top_k or top_p the tokens are drawn from a truncated distribution instead, and
these log-probs are then off-policy: they are not the log-probs of the distribution sampled.
"""

from dataclasses import dataclass

import torch

from nanowarp.padding import left_pad

# A check "have all rows finished?" reads a value back from the device: on a GPU that is a sync
# that stops the host from queueing the next steps ahead. Checking every 8 steps costs at most
# 7 wasted steps of a batch that is done. On a CPU the check is free, so it runs every step.
GPU_STOP_CHECK_EVERY = 8


@dataclass
class Samples:
    tokens: torch.Tensor  # (B, N) int64; the pad id after a row's EOS. N = longest completion
    mask: torch.Tensor  # (B, N) bool: generated tokens up to and including EOS
    finished: torch.Tensor  # (B,) bool: the row sampled EOS
    logprobs: torch.Tensor  # (B, N) float32 log-prob under softmax(logits / temperature); 0 where masked
    prompt: torch.Tensor  # (B, P) int64, the left-padded prompts
    prompt_mask: torch.Tensor  # (B, P) bool: 1 = prompt token, 0 = padding


# ---- one step of sampling ----------------------------------------------------------------------

def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None, probs_out=None):
    """Draw one token per row from softmax(logits / temperature), restricted to the top_k most
    likely tokens (0: no limit) and then to the smallest set of them holding top_p of the mass.

    logits (B, V). Returns token (B,) int64 and its log-prob (B,) float32 under the unrestricted
    softmax(logits / temperature). No device sync: safe inside a GPU decoding loop.
    probs_out: an optional contiguous fp32 (B, V) buffer for the probabilities.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = torch.div(logits, temperature, out=probs_out)
    probs = torch.softmax(logits, dim=-1, out=probs_out)  # (B, V), in place if logits is probs_out
    weights = probs if top_k == 0 and top_p >= 1.0 else truncate(probs, top_k, top_p)
    token = inverse_cdf(weights, generator)
    logprob = probs.gather(1, token[:, None]).squeeze(1).log()
    return token, logprob


def inverse_cdf(weights, generator=None, block=1024):
    """One index per row of weights (B, V) >= 0, drawn with probability proportional to its weight.

    Inverse CDF in two levels: a block of `block` indices, from the running sum of the blocks'
    weights, then an index within it, from the running sum inside the block. Each running sum
    adds a few dozen or a thousand numbers, so fp32 keeps every share exact to ~1e-7 of its block
    and nothing of size (B, V) is allocated. One fp32 cumsum over 50257 tokens would shift each
    token's share by up to 6e-8 absolute, the whole probability of a rare token (a total variation
    of ~3e-4 per draw); an fp64 one, with its (B, V) fp64 buffers, made a whole sampling step
    several times slower on a CPU. A zero weight is never drawn.
    """
    B, V = weights.shape
    u = 1.0 - torch.rand(B, 2, generator=generator, device=weights.device)  # in (0, 1]
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


def truncate(probs, top_k, top_p):
    """probs (B, V) with every token outside the top k, then outside the nucleus of mass top_p
    (the most likely tokens until their mass reaches top_p), set to 0. Ties at the cut are kept."""
    if top_k > 0:
        ranked = probs.topk(min(top_k, probs.size(-1)), dim=-1).values  # (B, k), descending
    else:
        ranked = probs.sort(dim=-1, descending=True).values  # (B, V)
    n_keep = ranked.new_full((ranked.size(0), 1), ranked.size(1), dtype=torch.long)
    if top_p < 1.0:
        mass_before = ranked.cumsum(-1) - ranked  # mass of the tokens ranked above each token
        n_keep = (mass_before < top_p * ranked.sum(-1, keepdim=True)).sum(-1, keepdim=True)  # >= 1
    threshold = ranked.gather(1, n_keep - 1)  # (B, 1), the smallest probability kept
    return probs.masked_fill(probs < threshold, 0.0)


# ---- the model steps (gpt-fast's split) --------------------------------------------------------

def lm_head(model, hidden, out=None):
    """Logits (B, V) of the last hidden states (B, C), the product model.lm_head computes, taken
    as (W·hᵀ)ᵀ: with a few dozen rows, MKL runs that orientation ~1.5x faster than h·Wᵀ on a
    CPU (measured with GPT-2's 50257 x 768 head), and the LM head is a third of a decoding step.
    out: an optional (V, B) buffer to write W·hᵀ into; the result is its transpose."""
    return torch.mm(model.lm_head.weight, hidden.t(), out=out).t()


def prefill(model, idx, attention_mask):
    """Run the left-padded prompts idx (B, P) through the model, filling cache slots 0..P-1.
    attention_mask (B, P). Returns the logits (B, V) at the last slot, all that sampling needs."""
    input_pos = torch.arange(idx.size(1), device=idx.device)
    hidden = model.hidden_states(idx, attention_mask, input_pos)  # (B, P, C)
    return lm_head(model, hidden[:, -1])


def decode_one_token(model, token, attention_mask, input_pos, logits_out=None):
    """Feed one token per row, token (B,), at cache slot input_pos (1,); logits (B, V) of the next.
    attention_mask (B, S) covers cache slots 0..S-1, S > input_pos. logits_out: see lm_head."""
    hidden = model.hidden_states(token[:, None], attention_mask, input_pos)  # (B, 1, C)
    return lm_head(model, hidden[:, 0], logits_out)


def decode_n_tokens(model, logits, attention_mask, max_new_tokens, eos_token_id, pad_id,
                    decode=decode_one_token, static_shapes=False, **sampling):
    """Sample up to max_new_tokens tokens per row, starting from the prefill's logits (B, V).
    attention_mask (B, P + max_new_tokens); sampling: sample_next's keyword arguments.
    Returns tokens (B, N), mask (B, N), finished (B,), logprobs (B, N); N = max_new_tokens."""
    (B, V), device = logits.shape, logits.device
    P = attention_mask.size(1) - max_new_tokens
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, max_new_tokens), dtype=torch.bool, device=device)
    logprobs = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    slots = torch.arange(P, P + max_new_tokens, device=device)
    # the logits and probabilities of every step go to the same two buffers: a fresh 13 MB tensor
    # per step (GPT-2, B = 64) costs page faults worth as much as the sampling itself on a CPU
    probs_buffer = torch.empty((B, V), dtype=torch.float32, device=device)
    logits_buffer = None if static_shapes else torch.empty((V, B), dtype=logits.dtype, device=device)
    check_every = 1 if device.type == "cpu" else GPU_STOP_CHECK_EVERY
    for i in range(max_new_tokens):
        token, logprob = sample_next(logits, probs_out=probs_buffer, **sampling)
        token = token.masked_fill(finished, pad_id)  # finished rows emit padding from now on
        tokens[:, i], logprobs[:, i], mask[:, i] = token, logprob.masked_fill(finished, 0.0), ~finished
        if eos_token_id is not None:
            finished |= token == eos_token_id
            if (i + 1) % check_every == 0 and finished.all():  # device sync
                break
        if i + 1 < max_new_tokens:
            # the mask up to the new token's slot, so attention skips the empty end of the cache;
            # all of it when the step is compiled, so that every step has the same shapes
            step_mask = attention_mask if static_shapes else attention_mask[:, :P + i + 1]
            logits = decode(model, token, step_mask, slots[i:i + 1], logits_buffer)
    return tokens, mask, finished, logprobs


# ---- the whole thing ---------------------------------------------------------------------------

_compiled_decode = None


def sample(model, prompts, max_new_tokens, eos_token_id=None, temperature=1.0, top_k=0, top_p=1.0,
           generator=None, compile=False):
    """Sample completions of a batch of prompts from a GPT2 model.

    prompts: list of lists of token ids, any lengths. Up to max_new_tokens tokens per row; a row
    stops at its first eos_token_id (None: exactly max_new_tokens tokens per row), and the loop
    stops once every row has. temperature > 0; top_k = 0 and top_p = 1 mean no truncation (see
    the module docstring: the returned log-probs ignore the truncation). generator: a
    torch.Generator on the model's device, for reproducible samples. compile: torch.compile the
    decoding step, for a GPU (fused kernels; no CUDA graphs, since the caches are new tensors
    at every call); each new (batch, prompt + new tokens) shape compiles again. On a 2-core CPU
    it compiled for a minute and ran no faster, hence off by default. top_p < 1 without top_k
    sorts the whole vocabulary at every step: slow on a CPU. The model runs as it is: put it in
    eval mode if it has dropout.

    Returns Samples; N = max_new_tokens without eos_token_id, else the longest completion.
    The model's caches are set up here and cleared on return, so it is ready for training again.
    """
    n_positions = model.config.n_positions
    vocab_size = model.config.vocab_size
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (GPT-2: start an empty prompt with "
                         "its BOS token, 50256)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need top_k >= 0 (0: off) and 0 < top_p <= 1 (1: off), got top_k={top_k}, top_p={top_p}")
    if any(t < 0 or t >= vocab_size for p in prompts for t in p):
        raise ValueError(f"prompt token ids must lie in [0, {vocab_size}), the model's vocabulary")
    P = max(len(p) for p in prompts)
    if P + max_new_tokens > n_positions:
        raise ValueError(f"longest prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"the model's n_positions ({n_positions}): shorten the prompts or ask for "
                         f"fewer new tokens")

    global _compiled_decode
    if compile and _compiled_decode is None:
        _compiled_decode = torch.compile(decode_one_token, fullgraph=True)
    decode = _compiled_decode if compile else decode_one_token

    device = model.lm_head.weight.device
    pad_id = eos_token_id if eos_token_id is not None else 0
    prompt, prompt_mask = left_pad(prompts, pad_id, device)
    prompt_mask = prompt_mask.bool()
    B = len(prompts)
    attention_mask = torch.cat([prompt_mask, prompt_mask.new_ones(B, max_new_tokens)], dim=1)
    # no_grad, not inference_mode: the outputs feed training forward passes, which cannot save
    # inference tensors for backward
    with torch.no_grad():
        try:
            model.setup_caches(B, P + max_new_tokens)
            logits = prefill(model, prompt, prompt_mask)
            tokens, mask, finished, logprobs = decode_n_tokens(
                model, logits, attention_mask, max_new_tokens, eos_token_id, pad_id, decode,
                static_shapes=compile, temperature=temperature, top_k=top_k, top_p=top_p,
                generator=generator)
        finally:
            model.clear_caches()
    if eos_token_id is not None:
        N = int(mask.sum(1).max())  # drop the columns no row used (one sync, after the loop)
        tokens, mask, logprobs = tokens[:, :N], mask[:, :N], logprobs[:, :N]
    return Samples(tokens, mask, finished, logprobs, prompt, prompt_mask)
