"""LoRA: a fresh adapter changes nothing, the effective dense weights reproduce the adapted model,
and only the adapter factors train."""

import pytest
import torch

from nanowarp.models.gpt2 import GPT2, GPT2Config
from nanowarp.lora import (LoRALinear, add_lora, default_targets, dense_state_dict, effective_state_dict, folded,
                           lora_modules, named_targets)
from nanowarp.sampling import sample, sample_micro_batches

CONFIG = GPT2Config(vocab_size=101, n_positions=32, n_embd=32, n_layer=2, n_head=4)


def base_and_adapted(rank=4, alpha=8):
    torch.manual_seed(0)
    base = GPT2(CONFIG).eval()
    adapted = GPT2(CONFIG).eval()
    adapted.load_state_dict(base.state_dict())
    return base, add_lora(adapted, rank=rank, alpha=alpha)


def batch():
    torch.manual_seed(1)
    return torch.randint(0, 101, (3, 9))


def test_fresh_adapter_equals_base():
    base, adapted = base_and_adapted()
    with torch.no_grad():
        assert torch.equal(base(batch()), adapted(batch()))


def test_default_targets_are_every_block_linear():
    _, adapted = base_and_adapted()
    names = {name for name, _ in lora_modules(adapted)}
    assert names == {f"transformer.h.{i}.{m}" for i in range(2)
                     for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert not isinstance(adapted.lm_head, LoRALinear)


def test_only_adapter_factors_require_grad():
    _, adapted = base_and_adapted()
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert len(trainable) == 2 * 8


def randomize_factors(model):
    torch.manual_seed(2)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_A.normal_(0, 0.3)
            m.lora_B.normal_(0, 0.3)


def test_effective_weights_reproduce_the_adapted_model():
    _, adapted = base_and_adapted()
    randomize_factors(adapted)
    plain = GPT2(CONFIG).eval()
    plain.load_state_dict(dense_state_dict(adapted))
    with torch.no_grad():
        a, b = adapted(batch()), plain(batch())
    assert (a - b).abs().max() <= 1e-5
    hf_plain = GPT2(CONFIG).eval().load_hf_state_dict(effective_state_dict(adapted))
    with torch.no_grad():
        assert (hf_plain(batch()) - a).abs().max() <= 1e-5


def test_effective_weight_is_w0_plus_scaled_ba():
    _, adapted = base_and_adapted(rank=4, alpha=8)
    randomize_factors(adapted)
    m = adapted.transformer.h[0].attn.c_attn
    assert m.scale == 2.0
    expected = m.weight.double() + 2.0 * m.lora_B.double() @ m.lora_A.double()
    assert torch.allclose(m.effective_weight().double(), expected, atol=1e-6)
    sd = effective_state_dict(adapted)
    assert torch.allclose(sd["transformer.h.0.attn.c_attn.weight"].double(), expected.T, atol=1e-6)
    assert not any("lora" in k for k in sd)


def test_backward_reaches_only_the_factors():
    _, adapted = base_and_adapted()
    randomize_factors(adapted)
    adapted(batch()).sum().backward()
    for n, p in adapted.named_parameters():
        assert (p.grad is not None) == n.endswith((".lora_A", ".lora_B")), n


def test_dropout_is_off_by_default_and_on_when_asked():
    _, adapted = base_and_adapted()
    assert isinstance(adapted.transformer.h[0].mlp.c_fc.dropout, torch.nn.Identity)
    layer = LoRALinear(torch.nn.Linear(8, 8), rank=2, alpha=2, dropout=0.5)
    assert isinstance(layer.dropout, torch.nn.Dropout)


def test_named_targets_picks_block_layers_by_their_own_name_in_model_order():
    model = GPT2(CONFIG)
    assert named_targets(model, "all") == default_targets(model)
    assert named_targets(model, "c_fc,c_attn") == [f"transformer.h.{i}.{m}" for i in range(2)
                                                   for m in ("attn.c_attn", "mlp.c_fc")]
    with pytest.raises(ValueError, match=r"^--lora_targets q_proj: the model has no such layer in its blocks; it has "
                                         r"c_attn, c_fc, c_proj \(or give all\)$"):
        named_targets(model, "c_fc,q_proj")


def test_alpha_defaults_to_the_rank_and_the_layer_says_its_rank_and_scale():
    torch.manual_seed(0)
    adapted = add_lora(GPT2(CONFIG), rank=4, targets=["transformer.h.0.mlp.c_fc"])
    (name, layer), = lora_modules(adapted)
    assert layer.scale == 1.0 and layer.extra_repr() == "32, 128, rank=4, scale=1"
    assert LoRALinear(torch.nn.Linear(8, 6), rank=2, alpha=3).extra_repr() == "8, 6, rank=2, scale=1.5"


def test_delta_weight_is_what_the_effective_weight_adds_to_w0():
    _, adapted = base_and_adapted(rank=4, alpha=8)  # scale 2
    layer = adapted.transformer.h[0].mlp.c_fc
    with torch.no_grad():
        torch.nn.init.normal_(layer.lora_B)
    delta = layer.delta_weight()
    assert torch.allclose(delta, 2.0 * layer.lora_B @ layer.lora_A) and delta.abs().max() > 0
    assert torch.allclose(layer.weight + delta, layer.effective_weight(), atol=1e-6)


def test_a_lora_layer_alone_adds_the_scaled_update_to_its_biased_layer_and_trains_only_the_factors():
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 6)
    torch.nn.init.normal_(base.bias)
    layer = LoRALinear(base, rank=8, alpha=4)
    assert isinstance(layer.dropout, torch.nn.Identity)  # dropout 0 unless asked
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    bound = 1 / 64 ** 0.5  # nn.Linear's initialisation: U(-1/√in, 1/√in)
    assert 0.97 * bound < layer.lora_A.abs().max() <= bound
    with torch.no_grad():
        torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 64)
    want = torch.nn.functional.linear(x, base.weight, base.bias) + 0.5 * x @ layer.lora_A.T @ layer.lora_B.T
    layer.eval()
    assert torch.allclose(layer(x), want, atol=1e-5)
    with folded(layer):
        assert torch.allclose(layer(x), want, atol=1e-5)
    assert torch.allclose(layer.effective_weight(base=torch.zeros(6, 64)), layer.delta_weight())


def test_lora_factors_take_the_layers_dtype_unless_given_and_rank_one_is_the_least():
    bf16 = torch.nn.Linear(8, 6).to(torch.bfloat16)
    own = LoRALinear(bf16, rank=1, alpha=1)
    assert own.lora_A.dtype == own.lora_B.dtype == torch.bfloat16
    layer = LoRALinear(bf16, rank=1, alpha=1, dtype=torch.float32)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    with torch.no_grad():
        torch.nn.init.normal_(layer.lora_B)
    assert layer.effective_weight().dtype == torch.float32
    # W0 upcast to float32, then s·B·A added (addmm may fuse the product and the sum: one rounding
    # instead of two, so up to an ulp apart); W0 + s·B·A rounded to bf16 would be ~1e-3 off
    torch.testing.assert_close(layer.effective_weight(), bf16.weight.float() + layer.delta_weight(),
                               rtol=2e-7, atol=1e-7)
    with pytest.raises(AssertionError, match="^LoRA rank must be at least 1$"):
        LoRALinear(bf16, rank=0, alpha=1)


def test_default_targets_of_the_llama_layout_are_every_block_linear():
    from nanowarp.models.llama import Llama
    from nanowarp.models.llama_config import LlamaConfig
    model = Llama(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1))
    assert default_targets(model) == [f"model.layers.{i}.{m}" for i in range(2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")]


def test_adding_lora_twice_is_refused():
    _, adapted = base_and_adapted()
    with pytest.raises(ValueError, match="not a plain nn.Linear"):
        add_lora(adapted, rank=2)
    with pytest.raises(ValueError, match=r"^cannot add LoRA to 'transformer.h.0.attn.c_attn': it is a LoRALinear, "
                                         r"not a plain nn.Linear$"):
        add_lora(adapted, rank=2, targets=["transformer.h.0.attn.c_attn"])
    with pytest.raises(ValueError, match=r"^cannot add LoRA to 'transformer.h.0.ln_1': it is a LayerNorm"):
        add_lora(GPT2(CONFIG), rank=2, targets=["transformer.h.0.ln_1"])


# ---- folded for sampling -------------------------------------------------------------------------

PROMPTS = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15], [3, 4, 5, 6], [7, 7]]


def own_logprobs(model, s, temperature=1.0):
    """log π(y_k | x, y_<k) of sampled tokens from model's plain (unfolded, uncached) forward."""
    idx = torch.cat([s.prompt, s.tokens], 1)
    mask = torch.cat([s.prompt_mask, s.mask], 1)
    mask[:, s.prompt.size(1):] = True  # attend to every completion slot (the padding after EOS predicts nothing used)
    with torch.no_grad():
        logits = model(idx, mask)[:, s.prompt.size(1) - 1:-1].double() / temperature
    lp = torch.log_softmax(logits, -1).gather(2, s.tokens[..., None]).squeeze(-1)
    return lp * s.mask


@pytest.mark.parametrize("micro", [0, 2])
def test_folded_sampling_gives_the_policys_logprobs(micro):
    _, adapted = base_and_adapted()
    randomize_factors(adapted)
    g = torch.Generator().manual_seed(0)
    with folded(adapted):
        assert all(m.folded is not None for _, m in lora_modules(adapted))
        s = sample_micro_batches(adapted, PROMPTS, 12, micro, g, eos_token_id=0, temperature=0.7)
    assert all(m.folded is None for _, m in lora_modules(adapted))
    assert s.mask.sum() > len(PROMPTS)
    assert (s.logprobs.double() - own_logprobs(adapted, s, 0.7)).abs().max() <= 1e-5


def test_folding_leaves_the_weights_bit_identical():
    _, adapted = base_and_adapted()
    randomize_factors(adapted)
    before = {k: v.clone() for k, v in adapted.state_dict().items()}
    w0 = adapted.transformer.h[0].attn.c_attn.weight
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        with folded(adapted):
            sample(adapted, PROMPTS[:2], 2, generator=g)
    after = adapted.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert adapted.transformer.h[0].attn.c_attn.weight is w0  # never replaced either


def test_folding_leaves_the_lora_gradients_unchanged():
    _, adapted = base_and_adapted()
    randomize_factors(adapted)

    def grads():
        adapted.zero_grad(set_to_none=True)
        adapted(batch()).logsumexp(-1).sum().backward()
        return {n: p.grad.clone() for n, p in adapted.named_parameters() if p.requires_grad}

    plain = grads()
    with folded(adapted):
        sample(adapted, PROMPTS, 4, generator=torch.Generator().manual_seed(0))
    again = grads()
    assert all(torch.equal(plain[n], again[n]) for n in plain)


def test_folded_matches_the_unfolded_layers_and_skips_bf16():
    _, adapted = base_and_adapted()
    randomize_factors(adapted)
    with torch.no_grad():
        unfolded = adapted(batch())
        with folded(adapted):
            assert (adapted(batch()) - unfolded).abs().max() <= 1e-5
    torch.manual_seed(0)
    bf16 = add_lora(GPT2(CONFIG).to(torch.bfloat16).eval(), rank=4, dtype=torch.float32)
    with folded(bf16):  # float32 factors on bf16 weights keep their low-rank branch
        assert all(m.folded is None for _, m in lora_modules(bf16))
        sample(bf16, PROMPTS, 4, generator=torch.Generator().manual_seed(0))


def test_folding_refuses_training_mode_with_dropout():
    torch.manual_seed(0)
    adapted = add_lora(GPT2(CONFIG), rank=4, dropout=0.1).train()
    with pytest.raises(RuntimeError, match="model.eval"):
        with folded(adapted):
            pass
    with folded(adapted.eval()):
        pass
