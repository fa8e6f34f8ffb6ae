"""Ids from nanowarp's tokenizers equal those of transformers' fast tokenizers, for every
layout a checkpoint may ship."""

import os

import pytest

from conftest import bpe_folder, wordpiece_folder
from nanowarp.hub import CheckpointError
from nanowarp.tokenizer import EOS, load_tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "A plain sentence about a movie.",
    "  leading spaces and trailing spaces  ",
    "Great film!<br /><br />Would watch again.",
    f"The end.{EOS}",
    f"{EOS} starts with EOS",
    "Unicode: café, naïve, Ünïcödé, 日本語, emoji 🎬🍿, “quotes” — dashes",
    "MiXeD CaSe and numbers 12345 and tabs\tand\nnewlines",
    "",
]


@pytest.mark.parametrize("layout", ["vocab", "json"])
def test_bpe_ids_match_gpt2_tokenizer(tmp_path, layout):
    folder = bpe_folder(str(tmp_path), layout)
    ours = load_tokenizer(folder)
    ref = transformers.GPT2TokenizerFast.from_pretrained(folder)
    for text in TEXTS:
        assert ours.encode(text).ids == ref(text)["input_ids"], text
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text


def test_bpe_eos_text_is_one_token(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    eos = tok.token_to_id(EOS)
    assert eos is not None and tok.encode(f"bye{EOS}").ids[-1] == eos


@pytest.mark.parametrize("lowercase", [True, False])
def test_wordpiece_ids_match_bert_tokenizer(tmp_path, lowercase):
    folder = wordpiece_folder(str(tmp_path), lowercase)
    ours = load_tokenizer(folder)
    ref = transformers.BertTokenizerFast.from_pretrained(folder)
    for text in TEXTS + ["[CLS] inside [SEP] text [MASK]"]:
        ids = ours.encode(text).ids
        assert ids == ref(text)["input_ids"], text
        assert ids[0] == ours.token_to_id("[CLS]") and ids[-1] == ours.token_to_id("[SEP]")


def test_wordpiece_tokenizer_json_layout(tmp_path):
    folder = wordpiece_folder(str(tmp_path))
    ref = transformers.BertTokenizerFast.from_pretrained(folder)
    ref.save_pretrained(str(tmp_path / "json"))
    os.remove(tmp_path / "json" / "vocab.txt") if (tmp_path / "json" / "vocab.txt").exists() else None
    ours = load_tokenizer(str(tmp_path / "json"))
    for text in TEXTS:
        assert ours.encode(text).ids == ref(text)["input_ids"], text


def test_folder_without_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="has no tokenizer"):
        load_tokenizer(str(tmp_path))


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))
