"""
y ~ π_θ(·|x), the first line of an RL step in Algorithm 1: sampling completions from GPT-2 or a
Llama-layout model with a static KV cache, in the style of gpt-fast's generate.py.

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

Sampling draws from softmax(logits / temperature) by inverse CDF (nanowarp/fast/sampling.py: 8 ms
of a 64-row GPT-2 decoding step on a CPU where `torch.multinomial`, the plain draw, takes 84 ms).

Returned log-probs are those of the sampled tokens under softmax(logits / temperature), the
distribution the RL loss and the KL penalty use, so the RL loop need not recompute the behaviour
policy. With top_k or top_p the tokens are drawn from a truncated distribution instead, and
these log-probs are then off-policy: they are not the log-probs of the distribution sampled.
"""

from dataclasses import dataclass

import torch

from nanowarp.fast.matmul import head_logits
from nanowarp.fast.sampling import inverse_cdf
from nanowarp.logprobs import final_softcap
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

def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None, probs_out=None, rows=None):
    """Draw one token per row from softmax(logits / temperature), restricted to the top_k most
    likely tokens (0: no limit) and then to the smallest set of them holding top_p of the mass.

    logits (B, V). Returns token (B,) int64 and its log-prob (B,) float32 under the unrestricted
    softmax(logits / temperature). No device sync: safe inside a GPU decoding loop.
    probs_out: an optional contiguous fp32 (B, V) buffer for the probabilities.
    rows: see fast.sampling.inverse_cdf.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = torch.div(logits, temperature, out=probs_out)
    probs = torch.softmax(logits, dim=-1, out=probs_out)  # (B, V), in place if logits is probs_out
    weights = probs if top_k == 0 and top_p >= 1.0 else truncate(probs, top_k, top_p)
    token = inverse_cdf(weights, generator, rows=rows)  # multinomial(weights, generator), fast
    logprob = probs.gather(1, token[:, None]).squeeze(1).log()
    return token, logprob


def multinomial(weights, generator=None):
    """One index per row of weights (B, V) >= 0, drawn with probability proportional to its weight:
    the plain draw, which fast.sampling.inverse_cdf does faster on a CPU (the tests compare the two)."""
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


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
    """Logits (B, V) of the last hidden states (B, C), the product model.lm_head computes, taken as
    (W·hᵀ)ᵀ (fast.matmul.head_logits; out: its optional (V, B) buffer). A bf16 model's head runs in
    float32 (model.head_fp32, set by `sample`): GPT-2's logits are around -100, where bf16's step is
    0.5, too coarse for the log-probs the KL penalty sums. Gemma 2's logits are soft-capped here."""
    if model.head_fp32 is not None:
        logits = head_logits(model.head_fp32, hidden.float(), out)
    else:
        logits = head_logits(model.lm_head.weight, hidden, out)
    cap = final_softcap(model)
    return logits if cap is None else torch.tanh(logits / cap) * cap


def first_eos(eos_token_id):
    """The pad id of a sampled batch: the EOS id, the first of several, or 0 without one."""
    if eos_token_id is None:
        return 0
    return eos_token_id[0] if isinstance(eos_token_id, (list, tuple)) else eos_token_id


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
    tokens = logits.new_full((B, max_new_tokens), pad_id, dtype=torch.long)  # on the logits' device
    mask = logits.new_zeros((B, max_new_tokens), dtype=torch.bool)
    logprobs = logits.new_zeros((B, max_new_tokens), dtype=torch.float32)
    finished = logits.new_zeros(B, dtype=torch.bool)
    slots = torch.arange(P, P + max_new_tokens, device=device)
    # the logits and probabilities of every step go to the same two buffers: a fresh 13 MB tensor
    # per step (GPT-2, B = 64) costs page faults worth as much as the sampling itself on a CPU
    probs_buffer = logits.new_empty((B, V), dtype=torch.float32)
    logits_buffer = None if static_shapes else logits.new_empty((V, B))
    check_every = 1 if device.type == "cpu" else GPU_STOP_CHECK_EVERY
    eos_ids = torch.tensor(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id or 0],
                           device=device)
    for i in range(max_new_tokens):
        token, logprob = sample_next(logits, probs_out=probs_buffer, **sampling)
        token = token.masked_fill(finished, pad_id)  # finished rows emit padding from now on
        tokens[:, i], logprobs[:, i], mask[:, i] = token, logprob.masked_fill(finished, 0.0), ~finished
        if eos_token_id is not None:
            finished |= torch.isin(token, eos_ids)  # any of the stop ids (generation_config.json's list)
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
           generator=None, compile=False, rows=None):
    """Sample completions of a batch of prompts from a GPT2 or Llama model.

    prompts: list of lists of token ids, any lengths. Up to max_new_tokens tokens per row; a row
    stops at its first eos_token_id, or at any of a list of them (None: exactly max_new_tokens
    tokens per row), and the loop stops once every row has. temperature > 0; top_k = 0 and
    top_p = 1 mean no truncation (see the module docstring: the returned log-probs ignore the
    truncation). generator: a
    torch.Generator on the model's device, for reproducible samples. compile: torch.compile the
    decoding step, for a GPU (fused kernels; no CUDA graphs, since the caches are new tensors
    at every call); each new (batch, prompt + new tokens) shape compiles again. On a 2-core CPU
    it compiled for a minute and ran no faster, hence off by default. top_p < 1 without top_k
    sorts the whole vocabulary at every step: slow on a CPU. The model runs as it is: put it in
    eval mode if it has dropout. rows = (start, total): the prompts are rows start.. of a batch
    of `total` (see fast.sampling.inverse_cdf and sample_micro_batches).

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
    pad_id = first_eos(eos_token_id)
    prompt, prompt_mask = left_pad(prompts, pad_id, device)
    prompt_mask = prompt_mask.bool()
    B = len(prompts)
    attention_mask = torch.cat([prompt_mask, prompt_mask.new_ones(B, max_new_tokens)], dim=1)
    # no_grad, not inference_mode: the outputs feed training forward passes, which cannot save
    # inference tensors for backward
    with torch.no_grad():
        try:
            model.setup_caches(B, P + max_new_tokens)
            if model.lm_head.weight.dtype != torch.float32:  # see lm_head
                model.head_fp32 = model.lm_head.weight.float()
            logits = prefill(model, prompt, prompt_mask)
            tokens, mask, finished, logprobs = decode_n_tokens(
                model, logits, attention_mask, max_new_tokens, eos_token_id, pad_id, decode,
                static_shapes=compile, temperature=temperature, top_k=top_k, top_p=top_p,
                generator=generator, rows=rows)
        finally:
            model.clear_caches()
            model.head_fp32 = None
    if eos_token_id is not None:
        N = int(mask.sum(1).max())  # drop the columns no row used (one sync, after the loop)
        tokens, mask, logprobs = tokens[:, :N], mask[:, :N], logprobs[:, :N]
    return Samples(tokens, mask, finished, logprobs, prompt, prompt_mask)


def sample_micro_batches(model, prompts, max_new_tokens, micro_batch_size, generator, **kwargs):
    """`sample` of a batch of prompts, micro_batch_size rows at a time (0: all at once): the same
    Samples as one call on the whole batch, to float rounding, with a fraction of its memory.

    Each piece starts from the generator's state at the call and draws the whole batch's random
    numbers (`rows`), so every row gets the numbers it would get in the whole batch. The whole
    batch runs as many decoding steps as its longest piece, which is the piece with the longest
    completion (steps grow with it), and leaves the generator where that piece left it."""
    B = len(prompts)
    if not micro_batch_size or micro_batch_size >= B:
        return sample(model, prompts, max_new_tokens, generator=generator, **kwargs)
    start_state, pieces, end_state, longest = generator.get_state(), [], None, -1
    for start in range(0, B, micro_batch_size):
        generator.set_state(start_state)
        s = sample(model, prompts[start:start + micro_batch_size], max_new_tokens, generator=generator,
                   rows=(start, B), **kwargs)
        pieces.append(s)
        if s.tokens.size(1) > longest:
            longest, end_state = s.tokens.size(1), generator.get_state()
    generator.set_state(end_state)
    pad_id = first_eos(kwargs.get("eos_token_id"))  # as `sample` pads
    P = max(s.prompt.size(1) for s in pieces)

    def right(t, value):  # completions: pad to `longest` columns on the right
        return torch.nn.functional.pad(t, (0, longest - t.size(1)), value=value)

    def left(t, value):  # prompts: pad to P columns on the left
        return torch.nn.functional.pad(t, (P - t.size(1), 0), value=value)

    return Samples(tokens=torch.cat([right(s.tokens, pad_id) for s in pieces]),
                   mask=torch.cat([right(s.mask, False) for s in pieces]),
                   finished=torch.cat([s.finished for s in pieces]),
                   logprobs=torch.cat([right(s.logprobs, 0.0) for s in pieces]),
                   prompt=torch.cat([left(s.prompt, pad_id) for s in pieces]),
                   prompt_mask=torch.cat([left(s.prompt_mask, False) for s in pieces]))
