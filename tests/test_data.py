"""IMDB preparation on a tiny dataset in the official layout (conftest.write_tiny_imdb): reading
from a folder or a tarball, order, labels, cleaning, filtering, prompts, safety, determinism, CLI."""

import io
import json
import os
import runpy
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from tokenizers import processors

from conftest import REVIEWS, write_tiny_imdb
from nanowarp import data
from nanowarp.data import DataError
from nanowarp.tokenizer import EOS, leading_special_ids, load_tokenizer


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ("meta.json", "prompts_train.npz", "prompts_eval.npz", "reviews_train.jsonl", "reviews_test.jsonl")
QUIET = dict(log=lambda *a: None)


@pytest.fixture(scope="module")
def imdb_tarball(imdb_dir, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tar") / "aclImdb_v1.tar.gz")
    with tarfile.open(path, "w:gz") as tar:
        tar.add(os.path.join(imdb_dir, "aclImdb"), arcname="aclImdb")
    return path


def read_bytes(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in FILES}


def test_read_imdb_order_is_neg_then_pos_by_numeric_id(tmp_path):
    written = write_tiny_imdb(tmp_path)  # ids 10, 9, 0, 11, 2, 100 in every folder; train/unsup must be ignored
    reviews = data.read_imdb(tmp_path)
    assert set(reviews) == {"train", "test"}
    for split in ("train", "test"):
        expected = [(text, y) for label, y in (("neg", 0), ("pos", 1)) for _, text in sorted(written[split, label])]
        assert reviews[split] == expected


def test_read_imdb_accepts_the_aclimdb_folder_itself(imdb_dir):
    assert data.read_imdb(os.path.join(imdb_dir, "aclImdb")) == data.read_imdb(imdb_dir)


def test_tarball_and_folder_give_identical_outputs(imdb_dir, imdb_tarball, bpe_dir, tmp_path):
    assert data.read_imdb(imdb_tarball) == data.read_imdb(imdb_dir)
    data.prepare(imdb_dir, bpe_dir, tmp_path / "a", **QUIET)
    data.prepare(imdb_tarball, bpe_dir, tmp_path / "b", **QUIET)
    a, b = read_bytes(tmp_path / "a"), read_bytes(tmp_path / "b")
    meta_a, meta_b = json.loads(a.pop("meta.json")), json.loads(b.pop("meta.json"))
    assert a == b
    assert {**meta_a, "source": None} == {**meta_b, "source": None}


def test_clean_removes_line_breaks_and_collapses_whitespace():
    assert data.clean("  Good.<br /><br />Great<br/>fun<BR>really\t\n  so ") == "Good. Great fun really so"


def test_reviews_files_hold_all_labelled_reviews_cleaned(prepared_imdb_dir):
    for split in ("train", "test"):
        texts, labels = data.load_reviews(prepared_imdb_dir, split)
        assert labels == [0] * 6 + [1] * 6
        assert all("<br" not in t and "  " not in t for t in texts)
        assert sum(len(t) < 200 for t in texts) == 4  # short reviews stay: the reward model trains on them


def test_prompts_come_from_reviews_of_at_least_min_chars(prepared_imdb_dir, bpe_dir):
    tok = load_tokenizer(bpe_dir)
    texts, labels = data.load_reviews(prepared_imdb_dir, "train")
    kept = [(t, y) for t, y in zip(texts, labels) if len(t) >= 200]
    prompts = data.load_prompts(prepared_imdb_dir, "train")
    assert len(prompts) == len(kept) == 8
    for prompt, (text, _) in zip(prompts, kept):
        assert prompt == tok.encode(text, add_special_tokens=False).ids[:len(prompt)]
    with np.load(os.path.join(prepared_imdb_dir, "prompts_train.npz")) as z:
        assert z["tokens"].dtype == np.int32 and z["offsets"].dtype == np.int64 and z["labels"].dtype == np.int8
        assert z["offsets"][0] == 0 and z["offsets"][-1] == len(z["tokens"])
        assert z["labels"].tolist() == [y for _, y in kept]


def test_eval_prompts_are_the_first_n_filtered_test_reviews(prepared_imdb_dir, bpe_dir):
    tok = load_tokenizer(bpe_dir)
    texts, _ = data.load_reviews(prepared_imdb_dir, "test")
    first = [t for t in texts if len(t) >= 200][:4]
    prompts = data.load_prompts(prepared_imdb_dir, "eval")
    assert len(prompts) == 4
    for prompt, text in zip(prompts, first):
        assert prompt == tok.encode(text, add_special_tokens=False).ids[:len(prompt)]
    meta = data.load_meta(prepared_imdb_dir)
    assert meta["counts"]["prompts_eval"] == 4 and meta["counts"]["prompts_train"] == 8
    assert meta["eos_token_id"] == tok.token_to_id("<|endoftext|>")


def test_eval_order_puts_the_reference_set_first_then_balances_the_labels():
    reviews = [(f"neg{i}", 0) for i in range(300)] + [(f"pos{i}", 1) for i in range(250)]
    order = data.eval_order(reviews)
    assert sorted(order) == sorted(reviews)  # a permutation
    assert order[:100] == reviews[:100]  # the reference's eval set: the first 100 (negative) reviews
    for n in (200, 202, 400, 500):
        assert sum(y for _, y in order[:n]) == n // 2  # half positive
    assert order[200:204] == [("pos100", 1), ("neg100", 0), ("pos101", 1), ("neg101", 0)]
    assert [t for t, _ in order[-50:]] == [f"neg{i}" for i in range(250, 300)]  # the surplus comes last


def test_prompt_lengths_are_in_range_and_seeded(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    texts = [" ".join(REVIEWS)] * 200  # long enough that every prompt reaches its drawn length
    lengths = lambda seed: [len(p) for p in data.make_prompts(texts, tok, 5, 20, seed)]
    assert min(lengths(0)) == 5 and max(lengths(0)) == 20
    assert lengths(0) == lengths(0)
    assert lengths(0) != lengths(1)


@pytest.mark.parametrize("prefix_chars", [10, 40, 256])
def test_prompts_are_exactly_the_opening_of_the_full_encoding(bpe_dir, monkeypatch, prefix_chars):
    monkeypatch.setattr(data, "PREFIX_CHARS", prefix_chars)  # small values force the fallback to whole texts
    tok = load_tokenizer(bpe_dir)
    texts = [" ".join(REVIEWS[i:] + REVIEWS[:i]) for i in range(len(REVIEWS))] + REVIEWS
    for seed in range(3):
        for text, prompt in zip(texts, data.make_prompts(texts, tok, 5, 20, seed)):
            assert prompt == tok.encode(text, add_special_tokens=False).ids[:len(prompt)]
            assert 5 <= len(prompt) <= 20


def test_short_reviews_keep_all_their_tokens(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    assert data.make_prompts(["Great."], tok, 5, 20) == [tok.encode("Great.", add_special_tokens=False).ids]


def test_output_is_byte_identical_across_runs(imdb_tarball, bpe_dir, tmp_path):
    data.prepare(imdb_tarball, bpe_dir, tmp_path / "a", seed=3, **QUIET)
    data.prepare(imdb_tarball, bpe_dir, tmp_path / "b", seed=3, **QUIET)
    assert read_bytes(tmp_path / "a") == read_bytes(tmp_path / "b")


def test_no_prompts_left_raises_and_writes_nothing(imdb_dir, bpe_dir, tmp_path):
    with pytest.raises(DataError, match="no train prompts left"):
        data.prepare(imdb_dir, bpe_dir, tmp_path / "out", min_chars=10_000, **QUIET)
    assert not os.path.exists(tmp_path / "out")


def unsafe_tarball(path, kind):
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("aclImdb/train/pos/1_10.txt")
        ok.size = 4
        tar.addfile(ok, io.BytesIO(b"good"))
        bad = tarfile.TarInfo({"absolute": "/tmp/evil.txt", "dotdot": "aclImdb/../../evil.txt"}.get(kind, "aclImdb/x"))
        if kind == "symlink":
            bad.type, bad.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "hardlink":
            bad.type, bad.linkname = tarfile.LNKTYPE, "aclImdb/train/pos/1_10.txt"
        elif kind == "device":
            bad.type = tarfile.CHRTYPE
        bad.size = 0 if bad.type != tarfile.REGTYPE else 4
        tar.addfile(bad, io.BytesIO(b"evil") if bad.isfile() else None)
    return path


@pytest.mark.parametrize("kind, why", [("absolute", "absolute path"), ("dotdot", "'..'"), ("symlink", "a link"),
                                       ("hardlink", "a link"), ("device", "a device")])
def test_unsafe_tarballs_are_refused(tmp_path, kind, why):
    path = unsafe_tarball(str(tmp_path / "bad.tar.gz"), kind)
    with pytest.raises(DataError, match=why):
        data.read_imdb(path)
    with pytest.raises(DataError, match=why):
        data.safe_extract(path, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


def test_safe_extract_extracts_a_clean_tarball(imdb_tarball, imdb_dir, tmp_path):
    data.safe_extract(imdb_tarball, tmp_path)
    assert data.read_imdb(tmp_path) == data.read_imdb(imdb_dir)


def test_missing_folder_in_the_layout_is_a_clear_error(tmp_path):
    os.makedirs(tmp_path / "aclImdb" / "train" / "pos")
    with pytest.raises(DataError, match="no folder train/neg"):
        data.read_imdb(tmp_path)


def test_source_from_url_is_downloaded_once(imdb_tarball, imdb_dir, tmp_path, monkeypatch):
    url = "file://" + os.path.abspath(imdb_tarball)
    assert data.read_imdb(url, cache_dir=tmp_path) == data.read_imdb(imdb_dir)
    assert os.listdir(tmp_path) == ["aclImdb_v1.tar.gz"]
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda *a: pytest.fail("downloaded twice"))
    data.download(url, tmp_path)


def test_loaders_say_to_run_prepare_first(tmp_path):
    for load in (data.load_meta, lambda d: data.load_prompts(d, "train"), lambda d: data.load_reviews(d, "test")):
        with pytest.raises(DataError, match="prepare.py"):
            load(tmp_path / "missing")


def run_cli(capsys, monkeypatch, *args):
    """`python data/imdb/prepare.py ARGS`, run as __main__ in this process (a process start spared):
    its exit status, stdout and stderr."""
    script = os.path.join(ROOT, "data", "imdb", "prepare.py")
    monkeypatch.setattr(sys, "argv", [script, *args])
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return subprocess.CompletedProcess(script, code, out.out, out.err)


def test_cli_writes_the_files(imdb_tarball, bpe_dir, tmp_path, capsys, monkeypatch):
    result = run_cli(capsys, monkeypatch, "--source", imdb_tarball, "--tokenizer", bpe_dir, "--out", str(tmp_path), "--n_eval", "2")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path)) == sorted(FILES)
    assert "train: 12 reviews, 8 with >= 200 characters" in result.stdout
    assert len(data.load_prompts(tmp_path, "eval")) == 2


def test_cli_missing_source_is_one_line_and_exit_2(bpe_dir, tmp_path):
    # a process of its own: the script run from the repo root, and what a user sees of an error
    result = subprocess.run([sys.executable, "data/imdb/prepare.py", "--source", str(tmp_path / "nope.tar.gz"),
                             "--tokenizer", bpe_dir, "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert "no IMDB data at" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "o")


def with_bos(tok):
    """The fixture tokenizer with a post-processor that puts a BOS first, as Llama 3's and Gemma's do."""
    bos = tok.token_to_id(EOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{EOS} $A", special_tokens=[(EOS, bos)])
    return tok, bos


def test_prompts_start_with_the_bos_the_tokenizer_puts_first(bpe_dir):
    plain = load_tokenizer(bpe_dir)
    assert leading_special_ids(plain) == []  # GPT-2's byte-level BPE puts nothing first
    tok, bos = with_bos(load_tokenizer(bpe_dir))
    assert leading_special_ids(tok) == [bos]
    texts = [" ".join(REVIEWS[i:] + REVIEWS[:i]) for i in range(len(REVIEWS))]
    for with_, without in zip(data.make_prompts(texts, tok, 5, 20, 0), data.make_prompts(texts, plain, 5, 20, 0)):
        assert with_ == [bos] + without  # k tokens of the review after the BOS
    assert data.encode_prompts(["Great movie."], tok, "--prompt") == [[bos] + plain.encode("Great movie.").ids]
    with pytest.raises(data.DataError, match="--prompt: prompt 1 encodes to no tokens"):
        data.encode_prompts([""], tok, "--prompt")
