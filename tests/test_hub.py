"""Hub ids: the local cache first, one file-list request when it is not enough, a clear offline
message; the files nanowarp writes are readable by others (no private 0600 checkpoints); and a
checkpoint a user can break (a wrong path, a missing or cut file, edited keys or config) is refused
with a message that names the problem, by every model class alike."""

import json
import os
import re
import shutil
import stat

import pytest
import torch

import huggingface_hub
import huggingface_hub.constants as constants
from huggingface_hub.errors import OfflineModeIsEnabled

from safetensors.torch import load_file, save_file

from nanowarp import hub
from nanowarp.hub import CheckpointError
from nanowarp.models.distilbert import DistilBertClassifier
from nanowarp.models.gpt2 import GPT2

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_cache(root, repo_id, files):
    """A huggingface_hub cache holding `files` of repo_id at revision main, as hf_hub_download lays it out."""
    repo = os.path.join(root, "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(COMMIT)
    snapshot = os.path.join(repo, "snapshots", COMMIT)
    os.makedirs(snapshot)
    for name in files:
        with open(os.path.join(snapshot, name), "w") as f:
            f.write("{}")
    return snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache, no network: every file-list request is counted and fails as offline."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    calls = []

    def list_repo_files(self, repo_id, **kw):
        calls.append(repo_id)
        raise OfflineModeIsEnabled("no network")

    def download(*a, **kw):
        raise AssertionError("no single-file request may be made")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return str(tmp_path / "hub"), calls


def test_complete_cache_asks_the_hub_nothing(cache):
    root, calls = cache
    snapshot = fake_cache(root, "owner/model", ["config.json", "model.safetensors", "vocab.json", "merges.txt"])
    assert hub.resolve("owner/model") == snapshot
    assert calls == []


def test_incomplete_cache_asks_for_the_file_list_once(cache):
    root, calls = cache
    fake_cache(root, "owner/model", ["config.json", "model.safetensors"])  # no tokenizer file
    hub.resolve("owner/model")  # falls back to the cache: the tokenizer loader reports what is missing
    assert calls == ["owner/model"]


def test_cached_config_without_weights_is_an_offline_error(cache):
    root, calls = cache
    fake_cache(root, "owner/model", ["config.json", "tokenizer.json"])
    with pytest.raises(CheckpointError, match=r"not in the local cache \(offline\)") as e:
        hub.resolve("owner/model")
    assert "has none of" not in str(e.value)
    assert calls == ["owner/model"]


def test_files_on_the_hub_are_fetched_by_list(cache, monkeypatch, tmp_path):
    """Only files the repo lists are requested: no probing of every candidate name."""
    root, _ = cache
    listed = ["config.json", "pytorch_model.bin", "vocab.txt", "README.md"]
    fetched = []
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id, **kw: listed)

    def download(repo_id, filename, revision=None):
        fetched.append(filename)
        return os.path.join(str(tmp_path), "snap", filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert hub.resolve("owner/model") == os.path.join(str(tmp_path), "snap")
    assert fetched == ["config.json", "pytorch_model.bin", "vocab.txt"]


def test_saved_checkpoint_files_share_one_mode(tmp_path):
    """safetensors replaces the file it writes (mode 0600): the checkpoint's weights must end up with
    the mode of every other file nanowarp writes (0666 less the umask)."""
    umask = os.umask(0o022)
    try:
        hub.save_checkpoint(str(tmp_path), {"model_type": "gpt2"}, {"w": torch.zeros(2)})
    finally:
        os.umask(umask)
    modes = {name: stat.S_IMODE(os.stat(tmp_path / name).st_mode) for name in ("model.safetensors", "config.json")}
    assert modes == {"model.safetensors": 0o644, "config.json": 0o644}


# ---- checkpoint errors a user can cause, for GPT-2 and DistilBERT alike ------------------------

# (model class, conftest fixture of a checkpoint of it, one weight's key in the file, the same key
# in the messages, without the file's prefix)
MODELS = {"gpt2": (GPT2, "tiny_gpt2_dir", "transformer.h.0.mlp.c_fc.weight", "h.0.mlp.c_fc.weight"),
          "distilbert": (DistilBertClassifier, "tiny_reward_dir", "distilbert.transformer.layer.0.ffn.lin1.weight",
                         "transformer.layer.0.ffn.lin1.weight")}


@pytest.fixture(params=list(MODELS))
def checkpoint(request, tmp_path):
    """(model class, a copy of a checkpoint of it in tmp_path, a weight's key in the file, the key in messages),
    without checksums.sha256, as from the Hub: the loaders' own checks (tests/test_checksums.py has the others)."""
    cls, fixture, key, shown = MODELS[request.param]
    folder = tmp_path / "checkpoint"
    shutil.copytree(request.getfixturevalue(fixture), folder)
    (folder / "checksums.sha256").unlink()
    return cls, folder, key, shown


def edit_weights(folder, edit):
    sd = load_file(folder / "model.safetensors")
    edit(sd)
    save_file(sd, folder / "model.safetensors")


def test_a_missing_folder_is_named(checkpoint, tmp_path):
    cls = checkpoint[0]
    with pytest.raises(CheckpointError, match="no checkpoint folder at .*nowhere: the folder does not exist"):
        cls.from_pretrained(str(tmp_path / "nowhere"))


def test_a_folder_without_config_or_weights_says_which(checkpoint):
    cls, folder, _, _ = checkpoint
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="holds no weights"):
        cls.from_pretrained(str(folder))
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        cls.from_pretrained(str(folder))


def test_a_truncated_safetensors_file_is_named(checkpoint):
    cls, folder, _, _ = checkpoint
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cannot read .*model\.safetensors: the file is corrupt or truncated"):
        cls.from_pretrained(str(folder))


def test_a_wrong_shape_names_the_key_and_both_shapes(checkpoint):
    cls, folder, key, shown = checkpoint
    edit_weights(folder, lambda sd: sd.update({key: torch.zeros(sd[key].shape[0] + 1, sd[key].shape[1])}))
    with pytest.raises(CheckpointError, match=rf"shape mismatch for '{re.escape(shown)}' in .*model\.safetensors: "
                                              rf"the file has \(\d+, \d+\)"):
        cls.from_pretrained(str(folder))


def test_unexpected_and_missing_keys_are_named(checkpoint):
    cls, folder, key, shown = checkpoint
    extra = key.replace(".0.", ".7.")
    edit_weights(folder, lambda sd: sd.update({extra: sd[key].clone()}))
    with pytest.raises(CheckpointError, match=rf"unexpected key '{re.escape(shown.replace('.0.', '.7.'))}'"):
        cls.from_pretrained(str(folder))
    edit_weights(folder, lambda sd: [sd.pop(extra), sd.pop(key)])
    with pytest.raises(CheckpointError, match=rf"missing key '{re.escape(shown)}'"):
        cls.from_pretrained(str(folder))


def test_an_unknown_model_type_is_named(checkpoint):
    cls, folder, _, _ = checkpoint
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="unknown model_type 'llama' in"):
        cls.from_pretrained(str(folder))
