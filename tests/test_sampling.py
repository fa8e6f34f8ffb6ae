"""Tests for nanowarp.sampling on tiny random GPT-2 models: cached decoding, padding invariance,
EOS bookkeeping, reproducibility, and the distribution the sampler draws from."""

import shutil

import pytest
import torch

from conftest import chi_square_critical
from nanowarp.models.gpt2 import GPT2, GPT2Config
from nanowarp.padding import left_pad
from nanowarp.sampling import decode_one_token, prefill, sample

PROMPTS = [[5, 17, 3], [40, 2, 9, 11, 60, 7, 21], [33], [8, 8, 1, 90, 4]]  # mixed lengths


def tiny_model(vocab_size=97, sharpness=5.0, seed=0):
    """A random 2-layer GPT-2. At the default init its next-token distribution is almost uniform
    (logits of std ~0.1); scaling the (tied) embeddings by `sharpness` makes it peaked, on the last
    input token (tied embeddings): 5 gives a top probability of ~0.1 for 97 tokens, 20 of ~1."""
    torch.manual_seed(seed)
    model = GPT2(GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=4))
    with torch.no_grad():
        model.transformer.wte.weight.mul_(sharpness)
    return model.eval()


def eos_likely_model(eos, strength):
    """A tiny model whose EOS logit is raised by about `strength` at every position: ln_f's bias
    points along a direction v, and EOS's embedding row is strength · v."""
    model = tiny_model()
    with torch.no_grad():
        v = torch.zeros(32)
        v[0] = 1.0
        model.transformer.ln_f.bias.copy_(v)
        model.transformer.wte.weight[eos] = strength * v
    return model


def row_logprobs(model, prompt, completion, temperature):
    """log-probs of `completion` after `prompt`, from one uncached forward pass of that row alone."""
    idx = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(idx)[0, len(prompt) - 1:-1] / temperature  # (n, V)
    return torch.log_softmax(logits, -1).gather(1, idx[0, len(prompt):, None]).squeeze(1)


def test_a_soft_capped_model_samples_from_its_capped_logits():
    """Gemma 2's final soft cap applies while sampling: the sampler's log-probs are those of the
    model's own (capped) logits, from one uncached forward pass of each row."""
    from nanowarp.models.llama import Llama
    from nanowarp.models.llama_config import LlamaConfig
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_hf(dict(
        model_type="gemma2", vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True, norm_offset=True, embed_scale=True,
        sandwich_norms=True, query_pre_attn_scalar=8, final_logit_softcapping=0.5))).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20)  # logits well beyond the cap, where it changes them
    s = sample(model, PROMPTS, 5, temperature=0.8, generator=torch.Generator().manual_seed(0))
    for i, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(s.logprobs[i], row_logprobs(model, prompt, s.tokens[i].tolist(), 0.8),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("mask_prefix", [True, False])
def test_cached_decoding_matches_full_forward_with_left_padding(mask_prefix):
    # mask_prefix: each step passes the mask up to its slot (the sampler); else the whole mask
    model = tiny_model()
    n_new = 6
    prompt, prompt_mask = left_pad(PROMPTS, pad_id=0)
    B, P = prompt.shape
    new = torch.randint(0, 97, (B, n_new), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.cat([prompt_mask, torch.ones(B, n_new, dtype=torch.bool)], 1)
    with torch.no_grad():
        full = model(torch.cat([prompt, new], 1), attention_mask)  # (B, P + n_new, V), no cache
        model.setup_caches(B, P + n_new)
        cached = [prefill(model, prompt, prompt_mask if mask_prefix else attention_mask)]
        for i in range(n_new - 1):
            step_mask = attention_mask[:, :P + i + 1] if mask_prefix else attention_mask
            cached.append(decode_one_token(model, new[:, i], step_mask, torch.tensor([P + i])))
        model.clear_caches()
    for i, logits in enumerate(cached):
        torch.testing.assert_close(logits, full[:, P - 1 + i], rtol=0, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_a_forward_pass_of_each_row_alone(temperature):
    eos = 96
    model = eos_likely_model(eos, strength=1.5)
    prompts = PROMPTS * 2
    s = sample(model, prompts, 12, eos_token_id=eos, temperature=temperature,
               generator=torch.Generator().manual_seed(0))
    assert 0 < s.finished.sum() < len(prompts), "want rows that stopped and rows that did not"
    for i, p in enumerate(prompts):
        n = int(s.mask[i].sum())
        expected = row_logprobs(model, p, s.tokens[i, :n].tolist(), temperature)
        torch.testing.assert_close(s.logprobs[i, :n], expected, rtol=0, atol=1e-5)
        assert (s.logprobs[i, n:] == 0).all()


def test_eos_bookkeeping():
    eos = 96
    model = eos_likely_model(eos, strength=1.5)
    B, max_new = 16, 20
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(B)]
    s = sample(model, prompts, max_new, eos_token_id=eos, generator=torch.Generator().manual_seed(3))
    N = s.tokens.size(1)
    assert s.tokens.shape == s.mask.shape == s.logprobs.shape == (B, N) and s.finished.shape == (B,)
    assert s.tokens.dtype == torch.int64 and s.mask.dtype == torch.bool
    assert 0 < s.finished.sum() < B
    for i in range(B):
        row = s.tokens[i].tolist()
        n = row.index(eos) + 1 if eos in row else N  # up to and including the first EOS
        assert s.finished[i] == (eos in row)
        assert s.mask[i].tolist() == [True] * n + [False] * (N - n)
        assert row[n:] == [eos] * (N - n)  # padded with the EOS id after the end
    assert N == int(s.mask.sum(1).max())  # no column that no row used
    prompt, prompt_mask = left_pad(prompts, eos)
    assert torch.equal(s.prompt, prompt) and torch.equal(s.prompt_mask, prompt_mask)


def decoding_steps(monkeypatch):
    """What each decoding step that `sample` runs from now on was given and gave: the width of its
    attention mask and the address of its logits (nanowarp.sampling.decode_one_token spied on)."""
    import nanowarp.sampling as sampling
    steps, real = [], sampling.decode_one_token

    def spy(model, token, attention_mask, input_pos, logits_out=None):
        logits = real(model, token, attention_mask, input_pos, logits_out)
        steps.append((attention_mask.size(1), logits.data_ptr()))
        return logits
    monkeypatch.setattr(sampling, "decode_one_token", spy)
    return steps


def test_loop_stops_when_every_row_has_finished(monkeypatch):
    """No decoding step after the one that sampled the last row's EOS (a step feeds the token just
    sampled, for the next); without EOS, max_new_tokens - 1 steps after the prefill. Step i attends
    to the P + i + 1 cache slots written so far, and writes its logits to the same buffer as every
    other step (a fresh (B, V) tensor per step costs page faults on a CPU)."""
    eos, steps = 96, decoding_steps(monkeypatch)
    model = eos_likely_model(eos, strength=2.0)  # rows end at different steps
    s = sample(model, PROMPTS, 30, eos_token_id=eos, generator=torch.Generator().manual_seed(0))
    lengths, P = s.mask.sum(1), max(map(len, PROMPTS))
    assert s.finished.all() and lengths.min() < lengths.max() < 30 and len(steps) == lengths.max() - 1
    assert [width for width, _ in steps] == [P + i + 1 for i in range(len(steps))]
    assert len({address for _, address in steps}) == 1
    steps.clear()
    sample(model, PROMPTS, 5, generator=torch.Generator().manual_seed(0))
    assert len(steps) == 4


def test_compile_compiles_the_step_once_and_runs_it_on_fixed_shapes(monkeypatch):
    """sample(compile=True), the GPU path, with torch.compile stood in for (the compiler itself is
    test_compiled_decoding_samples_what_eager_decoding_samples'): decode_one_token is compiled once,
    whole-graph, only when asked; every step gets the whole mask; the samples are eager's."""
    import nanowarp.sampling as sampling
    compiled, widths = [], []

    def fake_compile(fn, **kwargs):
        compiled.append((fn, kwargs))

        def step(model, token, attention_mask, input_pos, logits_out=None):
            widths.append(attention_mask.size(1))
            return fn(model, token, attention_mask, input_pos, logits_out)
        return step
    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(sampling, "_compiled_decode", None)
    model = tiny_model()
    eager = sample(model, PROMPTS, 6, generator=torch.Generator().manual_seed(3))
    assert compiled == []
    for _ in range(2):
        s = sample(model, PROMPTS, 6, generator=torch.Generator().manual_seed(3), compile=True)
        assert torch.equal(s.tokens, eager.tokens)
        torch.testing.assert_close(s.logprobs, eager.logprobs, rtol=0, atol=1e-5)
    assert compiled == [(sampling.decode_one_token, dict(fullgraph=True))]
    assert widths == [max(map(len, PROMPTS)) + 6] * 10  # 5 steps a call


def test_without_eos_every_row_gets_max_new_tokens():
    model = eos_likely_model(96, strength=8.0)
    s = sample(model, PROMPTS, 9, eos_token_id=None, generator=torch.Generator().manual_seed(0))
    assert s.tokens.shape == (len(PROMPTS), 9)
    assert s.mask.all() and not s.finished.any()
    assert (s.tokens == 96).any()  # EOS was sampled and did not stop anything


def test_seeded_generator_is_reproducible():
    model = tiny_model()

    def run(seed):
        return sample(model, PROMPTS, 10, eos_token_id=0, temperature=0.9, top_k=20, top_p=0.95,
                      generator=torch.Generator().manual_seed(seed))

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_decoding_samples_what_eager_decoding_samples():
    # the GPU path (compile=True: whole-mask steps of fixed shapes) gives the eager tokens
    model = tiny_model()
    eager, compiled = (sample(model, PROMPTS, 8, eos_token_id=0, generator=torch.Generator().manual_seed(3),
                              compile=c) for c in (False, True))
    assert torch.equal(eager.tokens, compiled.tokens) and torch.equal(eager.mask, compiled.mask)
    torch.testing.assert_close(eager.logprobs, compiled.logprobs, rtol=0, atol=1e-5)


def test_caches_are_cleared_and_the_model_trains_afterwards():
    model = tiny_model()
    sample(model, PROMPTS, 4)
    assert all(block.attn.kv_cache is None for block in model.transformer.h)
    with pytest.raises(ValueError, match="n_positions"):
        sample(model, PROMPTS, 60)  # 7 + 60 > 64
    assert all(block.attn.kv_cache is None for block in model.transformer.h)
    model(torch.tensor([PROMPTS[1]])).sum().backward()  # a plain forward + backward works
    assert model.transformer.wte.weight.grad is not None


def test_bad_arguments_raise_value_errors_that_say_what_is_wrong():
    model = tiny_model()  # vocabulary 97, 64 positions
    top = r"^need top_k >= 0 \(0: off\) and 0 < top_p <= 1 \(1: off\), got top_k={}, top_p={}$"
    for kwargs, message in [
            (dict(prompts=[[1], []]), r"^every prompt needs at least one token \(GPT-2: start an empty prompt with "
                                      r"its BOS token, 50256\)$"),
            (dict(max_new_tokens=0), r"^max_new_tokens must be at least 1, got 0$"),
            (dict(temperature=0.0), r"^temperature must be > 0, got 0.0$"),
            (dict(top_k=-1), top.format(-1, "1.0")), (dict(top_p=0.0), top.format(0, "0.0")),
            (dict(top_p=1.5), top.format(0, "1.5")),
            (dict(prompts=[[1, 97]]), r"^prompt token ids must lie in \[0, 97\), the model's vocabulary$")]:
        with pytest.raises(ValueError, match=message):
            sample(model, **(dict(prompts=PROMPTS, max_new_tokens=4) | kwargs))
    # the edges that are allowed: token id 0, a prompt and its completion filling every position
    assert sample(model, [[0, 96]], 62).tokens.shape == (1, 62)


def test_a_bf16_model_samples_from_float32_logits(monkeypatch):
    """The LM head of a bf16 model runs in float32 while sampling (see nanowarp.sampling.lm_head)."""
    import nanowarp.sampling as sampling
    dtypes, addresses, real = [], [], sampling.lm_head

    def spy(*args):
        logits = real(*args)
        dtypes.append(logits.dtype)
        addresses.append(logits.data_ptr())
        return logits
    monkeypatch.setattr(sampling, "lm_head", spy)
    model = tiny_model().to(torch.bfloat16)
    s = sample(model, PROMPTS, 4, generator=torch.Generator().manual_seed(0))
    assert dtypes == [torch.float32] * 4 and s.logprobs.dtype == torch.float32 and model.head_fp32 is None
    assert len(set(addresses[1:])) == 1  # the decoding steps' logits in one buffer (the prefill's apart)


def test_the_pad_id_is_the_first_stop_id_or_zero():
    """Prompts are left-padded, and finished rows padded, with the first of several stop ids;
    without a stop id, prompts are padded with 0."""
    model = eos_likely_model(7, 4.0)
    s = sample(model, PROMPTS, 8, eos_token_id=[7, 3], generator=torch.Generator().manual_seed(2))
    assert (~s.mask).any() and (s.tokens[~s.mask] == 7).all() and (s.prompt[~s.prompt_mask] == 7).all()
    s = sample(model, PROMPTS, 2, generator=torch.Generator().manual_seed(2))
    assert (~s.prompt_mask).any() and (s.prompt[~s.prompt_mask] == 0).all()


# ---- the distribution sampled, end to end (one token's draw: test_sampling_distribution.py) ----

def truncated(p, top_k, top_p):
    """The distribution top-k then top-p sampling draws from, written out token by token."""
    order = sorted(range(len(p)), key=lambda i: -p[i].item())
    candidates = order[:top_k] if top_k else order
    mass = sum(p[i].item() for i in candidates)
    kept, mass_before = [], 0.0
    for i in candidates:  # most likely first, until the kept mass reaches top_p
        if mass_before >= top_p * mass:
            break
        kept.append(i)
        mass_before += p[i].item()
    q = torch.zeros_like(p)
    q[kept] = p[kept]
    return q / q.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.3, 4, 1.0),
                                                     (1.0, 0, 0.8), (1.0, 6, 0.9)])
def test_sampled_frequencies_pass_a_chi_square_test(temperature, top_k, top_p):
    V, n = 12, 20000
    model = tiny_model(vocab_size=V, sharpness=3.0)
    prompt = [3, 1, 4]
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0, -1].double() / temperature
    p = torch.softmax(logits, -1)
    expected_p = truncated(p, top_k, top_p)
    assert (expected_p > 0).sum() >= 3 and p.max() < 0.9, "want a distribution worth testing"
    s = sample(model, [prompt] * n, 1, temperature=temperature, top_k=top_k, top_p=top_p,
               generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(s.tokens[:, 0], minlength=V).double()
    assert counts[expected_p == 0].sum() == 0  # nothing outside the truncated support
    expected = n * expected_p
    big = expected >= 5  # pool the small cells, as chi-square needs
    obs = torch.cat([counts[big], counts[~big & (expected > 0)].sum(0, keepdim=True)])
    exp = torch.cat([expected[big], expected[~big & (expected > 0)].sum(0, keepdim=True)])
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = ((obs - exp) ** 2 / exp).sum().item()
    assert stat < chi_square_critical(len(exp) - 1), (stat, obs, exp)


# ---- micro-batches ------------------------------------------------------------------------------

@pytest.mark.parametrize("micro", [0, 1, 2, 3, 4])
def test_micro_batches_sample_the_whole_batch_padded_as_it_pads(micro):
    """Pieces of different prompt and completion lengths (EOS likely, a pad id that is not 0) give the
    whole batch's Samples: every tensor, its padding included, and where the generator is left."""
    from nanowarp.sampling import sample_micro_batches
    model, eos = eos_likely_model(7, 4.0), [7, 3]
    g1, g2 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    whole = sample(model, PROMPTS, 8, eos_token_id=eos, generator=g1)
    pieces = sample_micro_batches(model, PROMPTS, 8, micro, g2, eos_token_id=eos)
    lengths = whole.mask.sum(1)
    assert lengths.min() < lengths.max() and whole.finished.any()  # rows end at different steps
    for name in ("tokens", "mask", "finished", "prompt", "prompt_mask"):
        assert torch.equal(getattr(whole, name), getattr(pieces, name)), name
    assert torch.allclose(whole.logprobs, pieces.logprobs, atol=1e-5) and (pieces.logprobs[~pieces.mask] == 0).all()
    assert torch.equal(g1.get_state(), g2.get_state())
    one = sample_micro_batches(model, PROMPTS, 1, micro, torch.Generator().manual_seed(2), eos_token_id=eos)
    assert torch.equal(one.tokens, sample(model, PROMPTS, 1, eos_token_id=eos,
                                          generator=torch.Generator().manual_seed(2)).tokens)
