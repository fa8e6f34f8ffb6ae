"""LoRA: a fresh adapter changes nothing, the effective dense weights reproduce the adapted model,
and only the adapter factors train."""

import pytest
import torch

from nanowarp.gpt2 import GPT2, GPT2Config
from nanowarp.lora import LoRALinear, add_lora, dense_state_dict, effective_state_dict, lora_modules

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


def test_adding_lora_twice_is_refused():
    _, adapted = base_and_adapted()
    with pytest.raises(ValueError, match="not a plain nn.Linear"):
        add_lora(adapted, rank=2)
