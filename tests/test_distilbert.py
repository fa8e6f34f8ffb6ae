"""DistilBERT classifier: parity with transformers, checkpoint round trips, base-model loading, errors
(the checkpoint errors every model class shares are in tests/test_hub.py)."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanowarp.hub import CheckpointError
from nanowarp.models.distilbert import DistilBertClassifier, DistilBertConfig

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64)
TOL = 1e-5


def tiny_hf(cls_name="DistilBertForSequenceClassification", seed=0, **overrides):
    """A tiny random transformers DistilBERT in eval mode. Weights are redrawn larger than the
    0.02 init so that every layer visibly changes the logits."""
    torch.manual_seed(seed)
    config = transformers.DistilBertConfig(**{**TINY, "num_labels": 3, **overrides})
    model = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_scale = name.endswith(("LayerNorm.weight", "layer_norm.weight"))
            p.copy_(torch.randn_like(p) * 0.3 + is_norm_scale)
    return model


def batches():
    """(input_ids, attention_mask) pairs: unpadded, right-padded and left-padded."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, TINY["vocab_size"], (4, 12), generator=g)
    lengths = torch.tensor([12, 9, 5, 1])
    right = (torch.arange(12)[None, :] < lengths[:, None]).long()
    left = right.flip(1)
    return {"unpadded": (ids, None), "right": (ids * right, right), "left": (ids * left, left)}


def hf_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def our_logits(model, ids, mask):
    with torch.no_grad():
        return model.eval()(ids, mask)


def max_diff(ours, hf):
    return max((our_logits(ours, ids, m) - hf_logits(hf, ids, m)).abs().max().item()
               for ids, m in batches().values())


def save_bin(hf_model, folder, prefix=True):
    """The older layout: config.json + pytorch_model.bin written with torch.save."""
    hf_model.config.save_pretrained(folder)
    sd = hf_model.state_dict()
    if not prefix:
        sd = {k.removeprefix("distilbert."): v for k, v in sd.items()}
    torch.save(sd, folder / "pytorch_model.bin")
    return folder


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf()


@pytest.fixture(scope="module")
def hf_folder(hf_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    hf_model.save_pretrained(folder)
    return folder


def edit_weights(src, dst, edit):
    """Copy checkpoint folder `src` to `dst`, passing its state dict through `edit`."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    sd = load_file(src / "model.safetensors")
    edit(sd)
    save_file(sd, dst / "model.safetensors")
    return dst


# --- parity ---

@pytest.mark.parametrize("layout", ["safetensors", "bin", "bin-no-prefix"])
def test_logits_match_transformers(hf_model, hf_folder, tmp_path, layout):
    if layout == "safetensors":
        folder = hf_folder
    else:
        folder = save_bin(hf_model, tmp_path, prefix=layout == "bin")
    ours = DistilBertClassifier.from_pretrained(folder)
    for name, (ids, mask) in batches().items():
        diff = (our_logits(ours, ids, mask) - hf_logits(hf_model, ids, mask)).abs().max().item()
        assert diff <= TOL, f"{layout}/{name}: max |logit diff| {diff:.2e}"


def test_padding_mask_is_used(hf_folder):
    ours = DistilBertClassifier.from_pretrained(hf_folder)
    ids, mask = batches()["right"]
    assert not torch.allclose(our_logits(ours, ids, mask), our_logits(ours, ids, None))
    # right padding leaves a row's logits as they are unpadded
    assert torch.allclose(our_logits(ours, ids[2:3, :5], None), our_logits(ours, ids, mask)[2:3], atol=TOL)


def test_config_fields_are_read(hf_folder):
    config = DistilBertClassifier.from_pretrained(hf_folder).config
    assert (config.dim, config.n_layers, config.n_heads, config.hidden_dim, config.num_labels) == (32, 2, 4, 64, 3)
    assert config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}


# --- round trips ---

def test_our_save_loads_in_transformers(hf_folder, tmp_path):
    ours = DistilBertClassifier.from_pretrained(hf_folder)
    ours.config.id2label = {0: "NEG", 1: "MID", 2: "POS"}
    ours.save_pretrained(tmp_path)
    theirs = transformers.DistilBertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert max_diff(ours, theirs) <= TOL
    assert theirs.config.id2label == {0: "NEG", 1: "MID", 2: "POS"}
    assert theirs.config.label2id == {"NEG": 0, "MID": 1, "POS": 2}


def test_fresh_model_saves_for_transformers(tmp_path):
    torch.manual_seed(0)
    ours = DistilBertClassifier(DistilBertConfig(**TINY, num_labels=2))
    ours.save_pretrained(tmp_path)
    theirs = transformers.DistilBertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert max_diff(ours, theirs) <= TOL


def test_load_save_keeps_every_tensor(hf_folder, tmp_path):
    DistilBertClassifier.from_pretrained(hf_folder).save_pretrained(tmp_path)
    before, after = load_file(hf_folder / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    again = DistilBertClassifier.from_pretrained(tmp_path)
    assert max_diff(again, transformers.DistilBertForSequenceClassification.from_pretrained(hf_folder)) <= TOL


# --- base (masked-LM) checkpoints ---

def test_masked_lm_checkpoint_gets_new_head(tmp_path, capsys, recwarn):
    mlm = tiny_hf("DistilBertForMaskedLM", num_labels=2)
    mlm.save_pretrained(tmp_path)
    capsys.readouterr()  # transformers' own progress bar
    ours = DistilBertClassifier.from_pretrained(tmp_path)
    message = capsys.readouterr().err
    assert len(recwarn) == 0 and message.count("\n") == 1  # one clear line, no UserWarning
    assert "new, randomly initialised classifier head (classifier, pre_classifier)" in message
    assert "ignored its masked-LM head (vocab_layer_norm, vocab_projector, vocab_transform)" in message
    assert ours.config.num_labels == 2
    # the encoder is the checkpoint's; the head is fresh: N(0, 0.02) weights, zero biases
    assert torch.equal(ours.transformer.layer[1].ffn.lin2.weight, mlm.distilbert.transformer.layer[1].ffn.lin2.weight)
    assert torch.count_nonzero(ours.pre_classifier.bias) == 0 and torch.count_nonzero(ours.classifier.bias) == 0
    assert 0.015 < ours.pre_classifier.weight.std().item() < 0.025
    hidden = mlm.distilbert(input_ids=batches()["right"][0], attention_mask=batches()["right"][1]).last_hidden_state
    head = ours.classifier(torch.relu(ours.pre_classifier(hidden[:, 0])))
    assert torch.allclose(our_logits(ours, *batches()["right"]), head.detach(), atol=TOL)


def test_partial_head_is_an_error(hf_folder, tmp_path):
    folder = edit_weights(hf_folder, tmp_path / "ckpt", lambda sd: sd.pop("classifier.weight"))
    with pytest.raises(CheckpointError, match=r"missing key 'classifier\.weight' in .*model\.safetensors"):
        DistilBertClassifier.from_pretrained(folder)


# --- sinusoidal position embeddings ---

def test_sinusoidal_positions_match_transformers(tmp_path):
    hf = tiny_hf(sinusoidal_pos_embds=True)
    hf.save_pretrained(tmp_path)
    ours = DistilBertClassifier.from_pretrained(tmp_path)
    assert max_diff(ours, hf) <= TOL
    torch.manual_seed(0)
    fresh_hf = transformers.DistilBertModel(transformers.DistilBertConfig(**TINY, sinusoidal_pos_embds=True))
    fresh = DistilBertClassifier(DistilBertConfig(**TINY, sinusoidal_pos_embds=True))
    assert torch.allclose(fresh.embeddings.position_embeddings.weight,
                          fresh_hf.embeddings.position_embeddings.weight, atol=1e-6)


# --- errors (those of every checkpoint: tests/test_hub.py) ---

def test_too_long_input(hf_folder):
    ours = DistilBertClassifier.from_pretrained(hf_folder)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours(torch.ones(1, 65, dtype=torch.long))
