"""nanowarp's Llama-layout decoder computes what transformers' Llama, Qwen2, Mistral, Gemma and
Gemma 2 compute, on left-padded batches, through the KV-cached sampler, and as classifiers."""

import os

import pytest
import torch

from nanowarp.logprobs import completion_logprobs
from nanowarp.models.llama import Llama, LlamaClassifier
from nanowarp.models.llama_config import LlamaConfig
from nanowarp.sampling import sample

transformers = pytest.importorskip("transformers")

TOL = 1e-5
V = 101
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# one tiny config per family, each with what sets it apart from Llama
FAMILIES = {
    "llama": ("Llama", dict(num_key_value_heads=2, tie_word_embeddings=False, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8))),  # GQA, untied head, Llama 3.1 rope scaling
    "qwen2": ("Qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True)),  # q/k/v biases, tied
    "mistral": ("Mistral", dict(num_key_value_heads=1, sliding_window=5)),  # a window shorter than the batch
    "gemma": ("Gemma", dict(num_key_value_heads=1, head_dim=16)),  # MQA, head_dim != hidden / heads
    "gemma2": ("Gemma2", dict(num_key_value_heads=2, head_dim=16, sliding_window=4, query_pre_attn_scalar=12,
                              attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
}


def reference(family, head="ForCausalLM", seed=0, **extra):
    """A random transformers model of the family; every weight jittered, so that the norms are
    not all 1 (or 0) and the biases not 0, and a mistake in any of them shows."""
    name, kw = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, f"{name}Config")(**COMMON, **kw, **extra)
    model = getattr(transformers, f"{name}{head}")(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def saved(model, folder):
    model.save_pretrained(folder)
    return folder


def left_padded_batch(lengths=(12, 7, 3)):
    torch.manual_seed(1)
    T = max(lengths)
    idx = torch.randint(3, V, (len(lengths), T))
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for r, n in enumerate(lengths):
        mask[r, T - n:] = 1
    return idx.masked_fill(mask == 0, 0), mask


def positions(mask):  # transformers takes positions from position_ids; generate() derives them like this
    return (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_on_left_padded_batches(family, tmp_path):
    ref = reference(family)
    model = Llama.from_pretrained(saved(ref, str(tmp_path))).eval()
    assert model.config.model_type == family
    idx, mask = left_padded_batch()
    with torch.no_grad():
        expected = ref(idx, attention_mask=mask, position_ids=positions(mask)).logits
        ours = model(idx, attention_mask=mask)
        alone = model(idx[1:2, -7:])  # row 1 without its padding
    real = mask.bool()
    assert (ours - expected)[real].abs().max() <= TOL
    assert (ours[1, -7:] - alone[0]).abs().max() <= TOL, "a padded row computes what it computes alone"


def test_llama3_rope_scaling_and_sliding_window_change_the_logits(tmp_path):
    """The features the parity test relies on are in effect: without them the logits differ."""
    idx, mask = left_padded_batch()
    for family, change in (("llama", dict(rope_scaling=None)), ("mistral", dict(sliding_window=None)),
                           ("gemma2", dict(sliding_window=None)), ("gemma2", dict(attn_logit_softcapping=None))):
        model = Llama.from_pretrained(saved(reference(family), str(tmp_path / family))).eval()
        other = Llama(LlamaConfig(**{**vars(model.config), **change})).eval()
        other.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert (model(idx, mask) - other(idx, mask))[mask.bool()].abs().max() > 1e-3, (family, change)


def test_config_json_of_transformers_4_is_read_like_5(tmp_path):
    """rope_theta + rope_scaling ("type": "llama3"), as transformers 4.x writes them, give the same config."""
    new = LlamaConfig.from_hf(dict(model_type="llama", **COMMON, rope_parameters=dict(
        rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8)))
    old = LlamaConfig.from_hf(dict(model_type="llama", **COMMON, rope_theta=5e5, rope_scaling=dict(
        type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8)))
    assert new == old and new.rope_theta == 5e5 and new.rope_scaling["rope_type"] == "llama3"


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_cached_sampler_logprobs_equal_a_full_forward(family, tmp_path):
    model = Llama.from_pretrained(saved(reference(family), str(tmp_path))).eval()
    prompts = [[5, 17, 3], [40, 9, 11, 60, 7, 21], [33]]
    s = sample(model, prompts, 8, eos_token_id=[2, 7], temperature=0.8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = completion_logprobs(model, s.prompt, s.prompt_mask, s.tokens, 0.8)  # fused, no cache
    torch.testing.assert_close(s.logprobs * s.mask, full * s.mask, rtol=0, atol=1e-5)
    for i, p in enumerate(prompts):  # and one plain forward of each row alone
        n = int(s.mask[i].sum())
        idx = torch.tensor([p + s.tokens[i, :n].tolist()])
        with torch.no_grad():
            logp = (model(idx)[0, len(p) - 1:-1] / 0.8).log_softmax(-1).gather(1, idx[0, len(p):, None])[:, 0]
        torch.testing.assert_close(s.logprobs[i, :n], logp, rtol=0, atol=1e-5)


def test_sampler_stops_at_any_of_several_eos_ids(tmp_path):
    """generation_config.json's list of EOS ids: each row stops at the first of any of them."""
    model = Llama.from_pretrained(saved(reference("qwen2"), str(tmp_path))).eval()
    prompts = [[5, 6]] * 8
    free = sample(model, prompts, 6, generator=torch.Generator().manual_seed(0)).tokens  # no EOS: 6 tokens each
    stops = [int(free[0, 2]), int(free[1, 3])]
    s = sample(model, prompts, 6, eos_token_id=stops, generator=torch.Generator().manual_seed(0))
    for row in range(len(prompts)):
        hits = [i for i, t in enumerate(free[row].tolist()) if t in stops]
        n = hits[0] + 1 if hits else 6
        assert int(s.mask[row].sum()) == n and bool(s.finished[row]) == bool(hits)
        assert s.tokens[row, :n].tolist() == free[row, :n].tolist()
    assert s.mask[0].sum() <= 3 and s.mask[1].sum() <= 4


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_classifier_logits_match_transformers(family, tmp_path):
    ref = reference(family, "ForSequenceClassification", num_labels=2)
    model = LlamaClassifier.from_pretrained(saved(ref, str(tmp_path))).eval()
    torch.manual_seed(2)
    idx = torch.randint(3, V, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    idx = idx.masked_fill(mask == 0, 0)  # right padding with the pad id, as transformers finds the last token
    with torch.no_grad():
        torch.testing.assert_close(model(idx, mask), ref(idx, attention_mask=mask).logits, rtol=0, atol=TOL)
    model.save_pretrained(str(tmp_path / "ours"))  # and back: transformers reads what nanowarp writes
    back = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "ours")).eval()
    assert type(back).__name__ == type(ref).__name__ and back.config.id2label == ref.config.id2label
    with torch.no_grad():
        torch.testing.assert_close(back(idx, attention_mask=mask).logits, model(idx, mask), rtol=0, atol=TOL)


def test_round_trip_nanowarp_saves_transformers_loads(tmp_path):
    for family in FAMILIES:
        ours = Llama.from_pretrained(saved(reference(family), str(tmp_path / "a" / family))).eval()
        folder = str(tmp_path / "b" / family)
        ours.save_pretrained(folder)
        back = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        assert type(back).__name__ == f"{FAMILIES[family][0]}ForCausalLM"
        idx, mask = left_padded_batch()
        with torch.no_grad():
            diff = ours(idx, mask) - back(idx, attention_mask=mask, position_ids=positions(mask)).logits
        assert diff[mask.bool()].abs().max() <= TOL, family
        assert os.path.isfile(os.path.join(folder, "config.json"))


@pytest.mark.parametrize("weight_grad", [False, True])
def test_fused_logprobs_and_kl_with_a_final_softcap(weight_grad):
    """Gemma 2's c·tanh(z / c) through token_logprobs (both gradient paths, in chunks) and sequence_kl."""
    from nanowarp.fast.logprobs import fused_sequence_kl as sequence_kl, fused_token_logprobs as token_logprobs
    torch.manual_seed(0)
    h = torch.randn(2, 5, 8, requires_grad=True)
    w = (2 * torch.randn(37, 8)).requires_grad_(weight_grad)  # logits of ~6: the cap of 3 bends them
    targets, g, cap, tau = torch.randint(0, 37, (2, 5)), torch.randn(2, 5), 3.0, 0.7

    def capped(h, w):
        return torch.tanh(h @ w.t() / cap) * cap / tau

    expected = capped(h, w).log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    ours = token_logprobs(h, w, targets, tau, chunk_size=3, softcap=cap)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    inputs = [h, w] if weight_grad else [h]
    for a, b in zip(torch.autograd.grad((ours * g).sum(), inputs), torch.autograd.grad((expected * g).sum(), inputs)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    with torch.no_grad():
        h_ref, w_ref = torch.randn(2, 5, 8), 2 * torch.randn(37, 8)
        p, q = capped(h, w).log_softmax(-1), capped(h_ref, w_ref).log_softmax(-1)
        kl = (p.exp() * (p - q)).sum(-1).sum(1)
        ours_kl = sequence_kl(h, w, h_ref, w_ref, torch.ones(2, 5), tau, chunk_size=3, softcap=cap, ref_softcap=cap)
    torch.testing.assert_close(ours_kl, kl, rtol=0, atol=1e-5)
