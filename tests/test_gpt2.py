"""nanowarp's GPT-2 computes what transformers' GPT2LMHeadModel computes, on checkpoints in
every layout users download, and writes checkpoints transformers reads back identically."""

import json
import os

import pytest
import torch

from nanowarp.fast.matmul import FEW_ROWS, linear
from nanowarp.hub import CheckpointError
from nanowarp.models import gpt2
from nanowarp.models.gpt2 import GPT2, GPT2Config

transformers = pytest.importorskip("transformers")

TOL = 1e-5


def reference_model(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=101, n_positions=48, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=100, eos_token_id=100)
    return transformers.GPT2LMHeadModel(config).eval()


def save_bin(ref, folder, prefix):
    """The pytorch_model.bin layout of lvwerra/gpt2-imdb: pickled, with the causal-mask buffers."""
    os.makedirs(folder, exist_ok=True)
    ref.config.save_pretrained(folder)
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    n = ref.config.n_positions
    for i in range(ref.config.n_layer):
        sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    if not prefix:
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    torch.save(sd, os.path.join(folder, "pytorch_model.bin"))
    return folder


def left_padded_batch(vocab=101, lengths=(12, 7, 3, 12)):
    torch.manual_seed(1)
    T = max(lengths)
    idx = torch.randint(0, vocab, (len(lengths), T))
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for r, n in enumerate(lengths):
        mask[r, T - n:] = 1
    return idx, mask


def reference_logits(ref, idx, mask):
    # transformers takes positions from position_ids; generate() derives them from the mask like this
    with torch.no_grad():
        return ref(idx, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits


@pytest.mark.parametrize("layout", ["safetensors", "bin-prefixed", "bin-bare"])
def test_logits_match_transformers(tmp_path, layout):
    ref = reference_model()
    folder = str(tmp_path)
    if layout == "safetensors":
        ref.save_pretrained(folder)
        assert os.path.exists(os.path.join(folder, "model.safetensors"))
    else:
        save_bin(ref, folder, prefix=layout == "bin-prefixed")
    model = GPT2.from_pretrained(folder).eval()
    idx, mask = left_padded_batch()
    with torch.no_grad():
        ours = model(idx, attention_mask=mask)
        full = model(idx)
    real = mask.bool()
    assert (ours - reference_logits(ref, idx, mask))[real].abs().max() <= TOL
    with torch.no_grad():
        assert (full - ref(idx).logits).abs().max() <= TOL


def test_left_padding_gives_each_row_its_unpadded_logits():
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=101, n_positions=48, n_embd=32, n_layer=2, n_head=4)).eval()
    idx, mask = left_padded_batch()
    with torch.no_grad():
        batch = model(idx, attention_mask=mask)
        for r in range(idx.size(0)):
            n = int(mask[r].sum())
            alone = model(idx[r:r + 1, idx.size(1) - n:])
            assert (batch[r, -n:] - alone[0]).abs().max() <= TOL
    assert torch.isfinite(batch).all()  # padding positions too


def test_hidden_states_feed_the_tied_lm_head():
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=101, n_positions=48, n_embd=32, n_layer=2, n_head=4)).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    idx, mask = left_padded_batch()
    with torch.no_grad():
        h = model.hidden_states(idx, attention_mask=mask)
        assert h.shape == (*idx.shape, 32)
        assert torch.equal(h @ model.transformer.wte.weight.T, model(idx, attention_mask=mask))


@pytest.mark.parametrize("shape", [(1, 24), (64, 24), (16, 1, 24), (3, 5, 24), (FEW_ROWS + 1, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_computes_f_linear_in_either_orientation(shape, bias):
    torch.manual_seed(0)
    w = torch.randn(40, 24, dtype=torch.float64, requires_grad=True)
    b = torch.randn(40, dtype=torch.float64, requires_grad=True) if bias else None
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    y = linear(x, w, b)
    ref = torch.nn.functional.linear(x, w, b)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(y, [x, w] + ([b] if bias else []), g)
    ref_grads = torch.autograd.grad(ref, [x, w] + ([b] if bias else []), g)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    rows = x.numel() // x.size(-1)
    if rows > 1:  # (one row is contiguous either way)
        assert y.is_contiguous() == (rows > FEW_ROWS)  # the few-rows path ran when it should


def test_save_pretrained_round_trips_through_transformers(tmp_path):
    ref = reference_model()
    ref.save_pretrained(str(tmp_path / "hf"))
    model = GPT2.from_pretrained(str(tmp_path / "hf")).eval()
    model.save_pretrained(str(tmp_path / "ours"))
    assert sorted(os.listdir(tmp_path / "ours")) == ["checksums.sha256", "config.json", "model.safetensors"]
    back = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "ours")).eval()
    idx, mask = left_padded_batch()
    with torch.no_grad():
        assert torch.equal(back(idx).logits, ref(idx).logits)
    again = GPT2.from_pretrained(str(tmp_path / "ours")).eval()
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_hf_state_dict_uses_conv1d_shapes():
    model = GPT2(GPT2Config(vocab_size=101, n_positions=48, n_embd=32, n_layer=1, n_head=4))
    sd = model.hf_state_dict()
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # [in, out]
    assert sd["transformer.h.0.mlp.c_proj.weight"].shape == (128, 32)
    assert "lm_head.weight" not in sd


# ---- errors a user can cause (those of every checkpoint class: tests/test_hub.py) ---------------

def test_a_wrong_shape_in_a_bin_file_names_the_key_and_the_file(tmp_path):
    ref = reference_model()
    save_bin(ref, str(tmp_path), prefix=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["n_embd"] = 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"shape mismatch for '.*' in .*pytorch_model.bin"):
        GPT2.from_pretrained(str(tmp_path))


def test_unexpected_and_missing_keys_in_a_bin_file_are_named(tmp_path):
    ref = reference_model()
    folder = save_bin(ref, str(tmp_path), prefix=True)
    sd = torch.load(os.path.join(folder, "pytorch_model.bin"), weights_only=True)
    sd["transformer.h.0.attn.extra"] = torch.zeros(3)
    torch.save(sd, os.path.join(folder, "pytorch_model.bin"))
    with pytest.raises(CheckpointError, match="unexpected key 'h.0.attn.extra'"):
        GPT2.from_pretrained(folder)
    del sd["transformer.h.0.attn.extra"], sd["transformer.ln_f.weight"]
    torch.save(sd, os.path.join(folder, "pytorch_model.bin"))
    with pytest.raises(CheckpointError, match="missing key 'ln_f.weight'"):
        GPT2.from_pretrained(folder)


def test_hub_id_while_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE is set and the file is not in the local cache"):
        GPT2.from_pretrained("lvwerra/gpt2-imdb")


# ---- GPT2Classifier: transformers' GPT2ForSequenceClassification -------------------------------

PAD = 0  # the classifier's pad_token_id; never inside the text (transformers finds the last token by it)


def reference_classifier(seed=0, labels=("NEGATIVE", "POSITIVE", "MIXED")):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=101, n_positions=48, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=100, eos_token_id=100, pad_token_id=PAD,
                                     id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    return transformers.GPT2ForSequenceClassification(config).eval()


def right_padded_batch(lengths=(12, 7, 1, 12)):
    torch.manual_seed(1)
    T = max(lengths)
    idx = torch.randint(1, 101, (len(lengths), T))  # never PAD
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for r, n in enumerate(lengths):
        mask[r, :n] = 1
    return idx.masked_fill(mask == 0, PAD), mask


def test_classifier_logits_match_transformers_on_right_padded_batches(tmp_path):
    ref = reference_classifier()
    ref.save_pretrained(str(tmp_path))
    model = gpt2.GPT2Classifier.from_pretrained(str(tmp_path)).eval()
    assert model.config.id2label == {0: "NEGATIVE", 1: "POSITIVE", 2: "MIXED"} and model.config.pad_token_id == PAD
    idx, mask = right_padded_batch()
    with torch.no_grad():
        ours, theirs = model(idx, mask), ref(idx, attention_mask=mask).logits
        alone = [model(idx[r:r + 1, :int(mask[r].sum())]) for r in range(idx.size(0))]
    assert ours.shape == (4, 3)
    assert (ours - theirs).abs().max() <= TOL
    assert (ours - torch.cat(alone)).abs().max() <= TOL  # each row reads its own last real token


def test_classifier_save_pretrained_round_trips_through_transformers(tmp_path):
    torch.manual_seed(0)
    config = gpt2.GPT2ClassifierConfig(vocab_size=101, n_positions=48, n_embd=32, n_layer=2, n_head=4,
                                       pad_token_id=PAD, id2label={0: "NEGATIVE", 1: "POSITIVE"})
    model = gpt2.GPT2Classifier(config).eval()
    model.save_pretrained(str(tmp_path))
    saved = json.load(open(tmp_path / "config.json"))
    assert saved["architectures"] == ["GPT2ForSequenceClassification"] and saved["label2id"]["POSITIVE"] == 1
    back = transformers.GPT2ForSequenceClassification.from_pretrained(str(tmp_path)).eval()
    assert back.config.id2label == {0: "NEGATIVE", 1: "POSITIVE"} and back.config.pad_token_id == PAD
    idx, mask = right_padded_batch()
    with torch.no_grad():
        assert (model(idx, mask) - back(idx, attention_mask=mask).logits).abs().max() <= TOL
    again = gpt2.GPT2Classifier.from_pretrained(str(tmp_path))
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_classifier_from_a_language_model_gets_a_fresh_head_with_a_warning(tmp_path):
    reference_model().save_pretrained(str(tmp_path))
    with pytest.warns(UserWarning, match="no classifier head"):
        model = gpt2.GPT2Classifier.from_pretrained(str(tmp_path))
    assert model.score.weight.shape == (2, 32)
    with pytest.raises(CheckpointError, match="unexpected key 'score.weight'"):
        reference_classifier().save_pretrained(str(tmp_path / "clf"))
        GPT2.from_pretrained(str(tmp_path / "clf"))  # a classifier is no language model
