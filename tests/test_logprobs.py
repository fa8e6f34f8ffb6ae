"""Tests for the fused log-prob and KL (nanowarp.fast.logprobs) against the plain ones of nanowarp.logprobs
(log_softmax + gather, the whole logits at once) in float64, and against a GPT-2 forward pass."""

import pytest
import torch

from nanowarp import logprobs as plain
from nanowarp.fast.logprobs import fused_sequence_kl, fused_token_logprobs
from nanowarp.models.gpt2 import GPT2, GPT2Config

B, T, d, V = 3, 11, 32, 97


def inputs(seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    weight = torch.randn(V, d, generator=g, dtype=torch.float64) * scale  # logits of std ~ 6 * scale
    targets = torch.randint(0, V, (B, T), generator=g)
    upstream = torch.randn(B, T, generator=g, dtype=torch.float64)  # the gradient flowing back
    return hidden, weight, targets, upstream


def reference(hidden, weight, targets, upstream, temperature):
    """The plain log_softmax + gather in float64, its gradients with respect to hidden and weight."""
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = plain.token_logprobs(hidden, weight, targets, temperature)
    grad_hidden, grad_weight = torch.autograd.grad((out * upstream).sum(), (hidden, weight))
    return out.detach(), grad_hidden, grad_weight


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("chunk_size", [1, 7, 32, None])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_values_and_gradients_match_float64_reference(chunk_size, temperature):
    hidden, weight, targets, upstream = inputs()
    ref, ref_gh, ref_gw = reference(hidden, weight, targets, upstream, temperature)
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    out = fused_token_logprobs(h, w, targets, temperature, chunk_size=chunk_size)
    (out * upstream.float()).sum().backward()
    assert out.shape == (B, T) and out.dtype == torch.float32
    assert rel_err(out, ref) <= 1e-5
    assert rel_err(h.grad, ref_gh) <= 1e-5
    assert rel_err(w.grad, ref_gw) <= 1e-5


@pytest.mark.parametrize("which", ["hidden", "weight"])
def test_gradient_to_one_input_only(which):
    hidden, weight, targets, upstream = inputs(seed=1)
    ref, ref_gh, ref_gw = reference(hidden, weight, targets, upstream, 0.9)
    h = hidden.float().requires_grad_(which == "hidden")
    w = weight.float().requires_grad_(which == "weight")
    (fused_token_logprobs(h, w, targets, 0.9, chunk_size=5) * upstream.float()).sum().backward()
    if which == "hidden":
        assert w.grad is None and rel_err(h.grad, ref_gh) <= 1e-5
    else:
        assert h.grad is None and rel_err(w.grad, ref_gw) <= 1e-5


def test_no_grad_gives_the_same_values():
    hidden, weight, targets, upstream = inputs(seed=2)
    with torch.no_grad():
        out = fused_token_logprobs(hidden.float().requires_grad_(), weight.float(), targets, 0.8, chunk_size=4)
    assert not out.requires_grad
    assert rel_err(out, reference(hidden, weight, targets, upstream, 0.8)[0]) <= 1e-5


def test_very_unlikely_targets_stay_finite_and_exact():
    # logits spread over hundreds of nats: exp(z_t - max) underflows, the log-prob must not
    hidden, weight, targets, upstream = inputs(seed=3, scale=10.0)
    ref, ref_gh, ref_gw = reference(hidden, weight, targets, upstream, 0.5)
    assert ref.min() < -200
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    out = fused_token_logprobs(h, w, targets, 0.5, chunk_size=8)
    (out * upstream.float()).sum().backward()
    assert torch.isfinite(out).all() and rel_err(out, ref) <= 1e-5
    assert rel_err(h.grad, ref_gh) <= 1e-5 and rel_err(w.grad, ref_gw) <= 1e-5


def test_bf16_inputs_are_computed_in_fp32():
    hidden, weight, targets, upstream = inputs(seed=4)
    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    ref, ref_gh, ref_gw = reference(hidden.double(), weight.double(), targets, upstream, 1.0)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = fused_token_logprobs(h, w, targets, chunk_size=10)
    (out * upstream.float()).sum().backward()
    assert out.dtype == torch.float32 and rel_err(out, ref) <= 1e-5  # exact for the rounded inputs
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16
    assert rel_err(h.grad, ref_gh) <= 1e-2 and rel_err(w.grad, ref_gw) <= 1e-2  # bf16 rounding only


def test_matches_log_softmax_of_a_gpt2_forward_pass():
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=V, n_positions=64, n_embd=d, n_layer=2, n_head=4))
    idx = torch.randint(0, V, (B, T))
    hidden = model.hidden_states(idx[:, :-1])
    out = fused_token_logprobs(hidden, model.lm_head.weight, idx[:, 1:], chunk_size=6)
    expected = torch.log_softmax(model(idx[:, :-1]), -1).gather(-1, idx[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    # gradients reach the transformer's weights through hidden (and the tied embedding both ways)
    torch.autograd.grad(out.sum(), model.transformer.h[0].attn.c_attn.weight)


@pytest.mark.parametrize("vocab", [1, 3, 4, 97, 50257])
def test_vocab_tiles_cover_the_vocabulary_once(vocab):
    from nanowarp.fast.logprobs import VOCAB_BLOCKS, _vocab_tiles
    tiles = _vocab_tiles(vocab)
    assert len(tiles) <= VOCAB_BLOCKS
    assert [i for t in tiles for i in range(vocab)[t]] == list(range(vocab))


def test_tiled_logsumexp_survives_a_tile_far_below_the_others():
    # one tile's logits hundreds of nats under the running maximum: its terms vanish, no NaN
    hidden, weight, targets, upstream = inputs(seed=5)
    weight[: V // 4] -= 50.0 * hidden.reshape(-1, d).mean(0) / hidden.reshape(-1, d).mean(0).norm() ** 2
    ref = reference(hidden, weight, targets, upstream, 1.0)[0]
    with torch.no_grad():
        out = fused_token_logprobs(hidden.float(), weight.float(), targets, chunk_size=4)
    assert torch.isfinite(out).all() and rel_err(out, ref) <= 1e-5


# ---- sequence_kl: the full-vocabulary KL along sampled prefixes -----------------------------------

def kl_inputs(seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden, ref_hidden = (torch.randn(B, T, d, generator=g, dtype=torch.float64) for _ in range(2))
    weight, ref_weight = (torch.randn(V, d, generator=g, dtype=torch.float64) * scale for _ in range(2))
    mask = torch.zeros(B, T)
    for r, n in enumerate((T, 4, 0)):  # a full row, a short one, an empty one
        mask[r, :n] = 1
    return hidden, weight, ref_hidden, ref_weight, mask


def reference_kl(hidden, weight, ref_hidden, ref_weight, mask, temperature):
    """The plain full-vocabulary KL(softmax(z) ‖ softmax(u)) in float64, at every position, masked and summed."""
    return plain.sequence_kl(hidden, weight, ref_hidden, ref_weight, mask.double(), temperature)


@pytest.mark.parametrize("chunk_size", [1, 5, None])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_sequence_kl_matches_float64_reference(chunk_size, temperature):
    hidden, weight, ref_hidden, ref_weight, mask = kl_inputs()
    ref = reference_kl(hidden, weight, ref_hidden, ref_weight, mask, temperature)
    out = fused_sequence_kl(hidden.float(), weight.float(), ref_hidden.float(), ref_weight.float(), mask, temperature,
                      chunk_size=chunk_size)
    assert out.shape == (B,) and out.dtype == torch.float32
    assert rel_err(out, ref) <= 1e-5
    assert out[2] == 0  # nothing counted in the empty row
    assert ref[0] > ref[1] > 0


def test_sequence_kl_depends_on_the_temperature():
    hidden, weight, ref_hidden, ref_weight, mask = kl_inputs(seed=1)
    args = hidden.float(), weight.float(), ref_hidden.float(), ref_weight.float(), mask
    cold, hot = fused_sequence_kl(*args, temperature=0.5), fused_sequence_kl(*args, temperature=2.0)
    assert (cold[:2] > hot[:2]).all()  # flatter distributions are closer
    assert rel_err(hot, reference_kl(hidden, weight, ref_hidden, ref_weight, mask, 2.0)) <= 1e-5


def test_sequence_kl_of_identical_models_is_zero():
    hidden, weight, _, _, mask = kl_inputs(seed=2)
    h, w = hidden.float(), weight.float()
    assert fused_sequence_kl(h, w, h, w, mask).abs().max() == 0


def test_sequence_kl_is_never_negative_and_exact_for_close_and_peaked_models():
    """Nearly identical models (where sampled estimates go negative: KL ~ 1e-7 a position, so
    fp32's absolute floor of ~1e-6 nats a position is what counts) and logits spread over
    hundreds of nats (where a naive exp underflows)."""
    for seed, noise, scale in ((3, 1e-3, 1.0), (4, 0.3, 10.0)):
        hidden, weight, _, _, mask = kl_inputs(seed=seed, scale=scale)
        g = torch.Generator().manual_seed(seed)
        ref_hidden = hidden + noise * torch.randn(hidden.shape, generator=g, dtype=torch.float64)
        ref = reference_kl(hidden, weight, ref_hidden, weight, mask, 0.5)
        out = fused_sequence_kl(hidden.float(), weight.float(), ref_hidden.float(), weight.float(), mask, 0.5, chunk_size=4)
        assert (out >= 0).all() and torch.isfinite(out).all()
        if noise < 0.01:
            assert ((out.double() - ref).abs() <= 1e-6 * mask.sum(1)).all() and ref.max() < 1e-5
        else:  # logits of hundreds in fp32: the floor is fp32's own rounding of the logits, which a
            # plain fp32 log_softmax over all of them reaches too (rel. error 1e-5 to 2.3e-4 by seed
            # and CPU's matmul kernel); the tiles must not add to it
            logp, logq = (torch.log_softmax(h.float() @ weight.float().T / 0.5, -1) for h in (hidden, ref_hidden))
            plain = ((logp.exp() * (logp - logq)).sum(-1) * mask).sum(1)
            assert rel_err(out, ref) <= 1.25 * rel_err(plain, ref) + 1e-6
            assert ((out.double() - ref).abs() <= 1e-5).all()


# ---- Gemma 2's final soft cap: z = c·tanh(h·Wᵀ / c) / τ --------------------------------------------

def capped(hidden, weight, temperature, cap):
    """The soft-capped logits, written as the model writes them (float64)."""
    return cap * torch.tanh(hidden @ weight.T / cap) / temperature


@pytest.mark.parametrize("chunk_size", [3, None])
@pytest.mark.parametrize("needs", ["hidden", "weight", "both"])
def test_soft_capped_values_and_gradients_match_float64(chunk_size, needs):
    # caps of 5 and 15 against logits of std ~6: tanh well inside its bend, where s = 1 − tanh² matters
    hidden, weight, targets, upstream = inputs(seed=5)
    for cap, temperature in ((5.0, 0.7), (15.0, 1.3)):
        h64, w64 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        ref = torch.log_softmax(capped(h64, w64, temperature, cap), -1).gather(-1, targets[..., None]).squeeze(-1)
        torch.testing.assert_close(plain.token_logprobs(hidden, weight, targets, temperature, cap), ref.detach())
        ref_gh, ref_gw = torch.autograd.grad((ref * upstream).sum(), (h64, w64))
        h = hidden.float().requires_grad_(needs in ("hidden", "both"))
        w = weight.float().requires_grad_(needs in ("weight", "both"))
        out = fused_token_logprobs(h, w, targets, temperature, chunk_size=chunk_size, softcap=cap)
        (out * upstream.float()).sum().backward()
        assert rel_err(out, ref.detach()) <= 1e-5, cap
        if h.requires_grad:
            assert rel_err(h.grad, ref_gh) <= 1e-5, cap
        if w.requires_grad:
            assert rel_err(w.grad, ref_gw) <= 1e-5, cap
        uncapped = fused_token_logprobs(hidden.float(), weight.float(), targets, temperature)
        assert rel_err(uncapped, ref.detach()) > 1e-2, "the cap must change the log-probs"


@pytest.mark.parametrize("caps", [(5.0, None), (None, 7.0), (5.0, 7.0)])
def test_sequence_kl_with_soft_caps_matches_float64(caps):
    hidden, weight, ref_hidden, ref_weight, mask = kl_inputs(seed=6)
    cap, ref_cap = caps
    z = capped(hidden, weight, 0.8, cap) if cap else hidden @ weight.T / 0.8
    u = capped(ref_hidden, ref_weight, 0.8, ref_cap) if ref_cap else ref_hidden @ ref_weight.T / 0.8
    logp, logq = torch.log_softmax(z, -1), torch.log_softmax(u, -1)
    ref = ((logp.exp() * (logp - logq)).sum(-1) * mask.double()).sum(1)
    out = fused_sequence_kl(hidden.float(), weight.float(), ref_hidden.float(), ref_weight.float(), mask, 0.8,
                      chunk_size=4, softcap=cap, ref_softcap=ref_cap)
    assert rel_err(out, ref) <= 1e-5
    uncapped = reference_kl(hidden, weight, ref_hidden, ref_weight, mask, 0.8)
    assert rel_err(uncapped, ref) > 1e-2, "the caps must change the KL"
    # the plain sequence_kl with the same caps is the written-out computation
    capped_plain = plain.sequence_kl(hidden, weight, ref_hidden, ref_weight, mask.double(), 0.8, cap, ref_cap)
    torch.testing.assert_close(capped_plain, ref)


def test_the_plain_computations_default_to_temperature_1():
    hidden, weight, targets, _ = inputs(seed=7)
    expected = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(plain.token_logprobs(hidden, weight, targets), expected)
    torch.testing.assert_close(plain.logits(hidden, weight), hidden @ weight.T)
    hidden, weight, ref_hidden, ref_weight, mask = kl_inputs(seed=7)
    torch.testing.assert_close(plain.sequence_kl(hidden, weight, ref_hidden, ref_weight, mask.double()),
                               reference_kl(hidden, weight, ref_hidden, ref_weight, mask, 1.0))


def test_soft_capped_values_without_gradient_are_the_same():
    hidden, weight, targets, _ = inputs(seed=7)
    with torch.no_grad():
        out = fused_token_logprobs(hidden.float(), weight.float(), targets, 0.9, chunk_size=4, softcap=6.0)
    ref = torch.log_softmax(capped(hidden, weight, 0.9, 6.0), -1).gather(-1, targets[..., None]).squeeze(-1)
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("hidden_shape, weight_shape", [((B, T, d), (V, d + 1)), ((B, T + 1, d), (V, d))])
def test_mismatched_shapes_are_named(hidden_shape, weight_shape):
    targets = torch.zeros(B, T, dtype=torch.long)
    with pytest.raises(AssertionError) as error:
        fused_token_logprobs(torch.zeros(hidden_shape), torch.zeros(weight_shape), targets)
    assert str(error.value) == f"shapes: hidden {hidden_shape}, weight {weight_shape}, targets {(B, T)}"


def test_completion_logprobs_of_a_soft_capped_model_are_its_forward_passs():
    # Gemma 2's final cap (final_softcap reads it from the config): the completion's log-probs are
    # those of the model's own capped logits
    from nanowarp.models.llama import Llama
    from nanowarp.models.llama_config import LlamaConfig
    from nanowarp.logprobs import completion_logprobs
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_hf(dict(
        model_type="gemma2", vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True, norm_offset=True, embed_scale=True,
        sandwich_norms=True, query_pre_attn_scalar=8, final_logit_softcapping=2.0))).eval()
    prompt, tokens = torch.randint(0, V, (B, 4)), torch.randint(0, V, (B, 5))
    out = completion_logprobs(model, prompt, torch.ones_like(prompt), tokens, 0.8)
    logits = model(torch.cat([prompt, tokens], 1))[:, 3:-1]
    expected = torch.log_softmax(logits / 0.8, -1).gather(-1, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
