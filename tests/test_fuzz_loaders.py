"""Every loader fed damaged files (hypothesis: a fixed number of examples, derandomized): weights cut
short, bytes flipped in their header and data, a header length larger than the file, wrong dtypes and
shapes; config.json, tokenizer files, job.json, state.pt, checksums.sha256 and prompt files cut,
flipped, not UTF-8, empty, or holding values of the wrong type or size. Each either loads or raises
a clear error that names the file (a CheckpointError, DataError, ValueError or OSError with its path),
never another exception, a hang (the deadline) or a large allocation (the peak memory)."""

import json
import os
import resource
import shutil
import struct
import tempfile

import pytest
import torch
from conftest import bpe_folder
from hypothesis import HealthCheck, given, settings, strategies as st

from nanowarp import hub, models
from nanowarp.data import DataError, load_prompt_file
from nanowarp.jobs.folder import read_job_file, read_state, write_state
from nanowarp.models.gpt2 import GPT2
from nanowarp.models.llama import LlamaClassifier
from nanowarp.models.llama_config import LlamaClassifierConfig
from nanowarp.reward import load_classifier
from nanowarp.tokenizer import load_tokenizer

FUZZ = settings(max_examples=30, deadline=2000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
CLEAR = (hub.CheckpointError, DataError, ValueError, OSError)  # what a user error may raise


@pytest.fixture(scope="module")
def tiny_gemma2_dir(bpe_dir, tmp_path_factory):
    """A random Gemma 2 (the Llama layout with the most config fields: windows, soft caps, layer types)."""
    from test_families import GEMMA2, checkpoint, policy
    return checkpoint(str(tmp_path_factory.mktemp("gemma2_fuzz")), policy(bpe_dir, **GEMMA2), bpe_dir)


@pytest.fixture(scope="module")
def tiny_qwen2_reward_dir(bpe_dir, tmp_path_factory):
    """A random Qwen2 sequence classifier (NEGATIVE, POSITIVE)."""
    from test_families import ARCH, checkpoint, eos_of
    torch.manual_seed(1)
    vocab = len(json.load(open(os.path.join(bpe_dir, "vocab.json"))))
    config = LlamaClassifierConfig(model_type="qwen2", vocab_size=vocab, qkv_bias=True, tie_word_embeddings=True,
                                   pad_token_id=eos_of(bpe_dir), id2label={0: "NEGATIVE", 1: "POSITIVE"}, **ARCH)
    return checkpoint(str(tmp_path_factory.mktemp("qwen2_fuzz")), LlamaClassifier(config), bpe_dir)


LOADERS = [("tiny_gpt2_dir", GPT2.from_pretrained), ("tiny_reward_dir", load_classifier),
           ("tiny_gemma2_dir", models.from_pretrained), ("tiny_qwen2_reward_dir", load_classifier)]


@pytest.fixture(autouse=True)
def little_memory():
    """No loader may allocate much on the way to its error (the peak resident memory of this process)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    yield
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 512 * 1024


def loads_or_names(load, path):
    """load() succeeds, or raises one of CLEAR whose message holds `path`."""
    try:
        load()
    except CLEAR as e:
        assert str(path) in str(e), f"{type(e).__name__} does not name {path}: {e}"


def damaged_copy(src, tmp, name, data):
    """A copy of the checkpoint src in tmp/ckpt, its file `name` replaced by `data`, without
    checksums.sha256 (the loaders' own checks; with it, any changed byte is named: test_checksums.py)."""
    folder = os.path.join(tmp, "ckpt")
    shutil.copytree(src, folder)
    if os.path.exists(os.path.join(folder, "checksums.sha256")):
        os.remove(os.path.join(folder, "checksums.sha256"))
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)
    return folder, os.path.join(folder, name)


def read(folder, name):
    with open(os.path.join(folder, name), "rb") as f:
        return f.read()


# generic damage to any file: cut, a byte flipped, bytes inserted, emptied, not UTF-8
def damage(data):
    n = len(data)
    return st.one_of(
        st.integers(0, n - 1).map(lambda k: data[:k]),
        st.tuples(st.integers(0, n - 1), st.integers(1, 255)).map(
            lambda t: data[:t[0]] + bytes([data[t[0]] ^ t[1]]) + data[t[0] + 1:]),
        st.tuples(st.integers(0, n), st.binary(min_size=1, max_size=16)).map(lambda t: data[:t[0]] + t[1] + data[t[0]:]),
        st.just(b""), st.just(b"\xff\xfe\x00 not utf-8 \xc3\x28"), st.just(data + b"\n" + b"x" * 100_000))


# ---- model.safetensors ----------------------------------------------------------------------

def safetensors_damage(data):
    """Generic damage, or a header length field that lies, or one tensor's dtype, shape or offsets changed."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    names = sorted(k for k in header if k != "__metadata__")

    def with_header(h):
        text = json.dumps(h).encode()
        return struct.pack("<Q", len(text)) + text + data[8 + length:]

    def edit(t):
        name, key, value = t
        return with_header({**header, name: {**header[name], key: value}})

    values = {"dtype": st.sampled_from(["F16", "BF16", "F64", "I32", "U32", "I64", "I8", "BOOL", "F8_E4M3", "X"]),
              "shape": st.lists(st.integers(0, 2 ** 40), max_size=4),
              "data_offsets": st.lists(st.integers(0, 2 ** 62), min_size=0, max_size=3)}
    return st.one_of(
        damage(data),
        st.integers(0, 2 ** 64 - 1).map(lambda n: struct.pack("<Q", n) + data[8:]),
        st.tuples(st.sampled_from(names), st.sampled_from(list(values)), st.just(None)).flatmap(
            lambda t: values[t[1]].map(lambda v: edit((t[0], t[1], v)))))


@pytest.mark.parametrize("fixture, load", LOADERS)
def test_a_damaged_weights_file_loads_or_is_named(request, fixture, load):
    src = request.getfixturevalue(fixture)

    @FUZZ
    @given(data=safetensors_damage(read(src, "model.safetensors")))
    def check(data):
        with tempfile.TemporaryDirectory() as tmp:
            folder, path = damaged_copy(src, tmp, "model.safetensors", data)
            loads_or_names(lambda: load(folder), path)
            loads_or_names(lambda: hub.check_readable(folder), path)
    check()


# ---- config.json ----------------------------------------------------------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=3), max_leaves=5)


def config_damage(data):
    config = json.loads(data)
    return st.one_of(
        damage(data), json_values.map(lambda v: json.dumps(v).encode()),
        st.tuples(st.sampled_from(sorted(config)), json_values).map(
            lambda t: json.dumps({**config, t[0]: t[1]}).encode()))


@pytest.mark.parametrize("fixture, load", LOADERS)
def test_a_damaged_config_loads_or_is_named(request, fixture, load):
    src = request.getfixturevalue(fixture)

    @FUZZ
    @given(data=config_damage(read(src, "config.json")))
    def check(data):
        with tempfile.TemporaryDirectory() as tmp:
            folder, path = damaged_copy(src, tmp, "config.json", data)
            loads_or_names(lambda: load(folder), path)
    check()


# ---- tokenizer files ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bpe_json_dir(tmp_path_factory):
    """The fixture BPE as tokenizer.json alone."""
    return bpe_folder(str(tmp_path_factory.mktemp("bpe_json")), "json")


@pytest.mark.parametrize("fixture, name", [("tiny_gpt2_dir", "vocab.json"), ("tiny_gpt2_dir", "merges.txt"),
                                           ("tiny_gpt2_dir", "special_tokens_map.json"),
                                           ("tiny_reward_dir", "vocab.txt"), ("tiny_reward_dir", "tokenizer_config.json"),
                                           ("bpe_json_dir", "tokenizer.json")])
def test_a_damaged_tokenizer_file_loads_or_is_named(request, fixture, name):
    src = request.getfixturevalue(fixture)

    @settings(FUZZ, max_examples=10)
    @given(data=damage(read(src, name)))
    def check(data):
        with tempfile.TemporaryDirectory() as tmp:
            folder, path = damaged_copy(src, tmp, name, data)
            loads_or_names(lambda: load_tokenizer(folder), path)
    check()


# ---- job.json, state.pt, checksums.sha256, prompt files -------------------------------------

def test_a_damaged_job_file_is_named(tmp_path):
    path = str(tmp_path / "job.json")
    original = json.dumps({"steps": 3, "lr": 1e-3}).encode()

    @FUZZ
    @given(data=damage(original) | json_values.map(lambda v: json.dumps(v).encode()))
    def check(data):
        with open(path, "wb") as f:
            f.write(data)
        loads_or_names(lambda: read_job_file(path, str(tmp_path)), path)
    check()


def test_a_damaged_training_state_is_named(tmp_path):
    path = str(tmp_path / "state.pt")
    write_state({"step": 2, "params": {"w": torch.arange(64.0)}, "rng": torch.get_rng_state()}, path)
    original = read(str(tmp_path), "state.pt")
    os.remove(path + ".sha256")  # the reader's own checks (with it, any change is named)

    @FUZZ
    @given(data=damage(original))
    def check(data):
        with open(path, "wb") as f:
            f.write(data)
        loads_or_names(lambda: read_state(path), path)
    check()


def test_a_damaged_checksums_file_is_named(tiny_gpt2_dir, tmp_path):
    folder = str(tmp_path / "ckpt")
    shutil.copytree(tiny_gpt2_dir, folder)
    path = os.path.join(folder, "checksums.sha256")
    original = read(folder, "checksums.sha256")

    @FUZZ
    @given(data=damage(original) | st.text(max_size=200).map(str.encode))
    def check(data):
        with open(path, "wb") as f:
            f.write(data)
        loads_or_names(lambda: hub.load_state_dict(folder), os.path.dirname(path))
    check()


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_a_damaged_prompt_file_loads_or_is_named(bpe_dir, tmp_path, suffix):
    tokenizer = load_tokenizer(bpe_dir)
    path = str(tmp_path / f"prompts{suffix}")
    original = "".join(json.dumps({"prompt": p}) + "\n" if suffix == ".jsonl" else p + "\n"
                       for p in ("This movie was", "I hated", "A film")).encode()

    @settings(FUZZ, max_examples=15)
    @given(data=damage(original))
    def check(data):
        with open(path, "wb") as f:
            f.write(data)
        loads_or_names(lambda: load_prompt_file(path, tokenizer), path)
    check()
