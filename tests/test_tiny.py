"""The tiny setting's tokenizers: the same files in every run, and a WordPiece read back from its
vocab.txt as any BERT checkpoint's is."""

import filecmp
import os
import subprocess
import sys

from conftest import REVIEWS
from nanowarp.study import tiny
from nanowarp.tokenizer import BERT_SPECIALS, load_tokenizer


def train_both(folder):
    """The tiny setting's two tokenizers, trained into folder/policy and folder/reward."""
    tiny.train_bpe(REVIEWS, 400, os.path.join(folder, "policy"), 64)
    tiny.train_wordpiece(REVIEWS, 300, os.path.join(folder, "reward"), 64)


# train_both in a fresh process: the tokenizers library visits words in the order of a hash map
# seeded anew in each process, which is where run-to-run differences would come from.
TRAIN = "import sys, test_tiny; test_tiny.train_both(sys.argv[1])"


def test_tokenizers_are_the_same_files_in_every_run(tmp_path):
    tests = os.path.dirname(__file__)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.path.dirname(tests)])}
    runs = [tmp_path / str(i) for i in range(2)]
    train_both(str(runs[0]))  # this process, and a fresh one with a hash seed of its own (a set or a dict's order)
    subprocess.run([sys.executable, "-c", TRAIN, str(runs[1])], env={**env, "PYTHONHASHSEED": "1"}, check=True)
    for kind in ("policy", "reward"):
        names = sorted(os.listdir(runs[0] / kind))
        assert "tokenizer.json" in names
        for run in runs[1:]:
            assert sorted(os.listdir(run / kind)) == names
            match, mismatch, errors = filecmp.cmpfiles(runs[0] / kind, run / kind, names, shallow=False)
            assert not mismatch and not errors, (kind, mismatch, errors)


def test_wordpiece_is_renumbered_and_read_back(tmp_path):
    trained = tiny.train_wordpiece(REVIEWS, 300, str(tmp_path), 64)
    with open(tmp_path / "vocab.txt", encoding="utf-8") as f:
        vocab = f.read().splitlines()
    assert len(vocab) == trained.get_vocab_size() == len(set(vocab))
    assert vocab[:5] == BERT_SPECIALS and vocab[5:] == sorted(vocab[5:])
    # every character that continues a word has its ## piece, so no word of the texts is [UNK]
    loaded = load_tokenizer(str(tmp_path))
    for text in REVIEWS:
        ids = loaded.encode(text).ids
        assert ids == trained.encode(text).ids
        assert ids[0] == vocab.index("[CLS]") and ids[-1] == vocab.index("[SEP]")
        assert vocab.index("[UNK]") not in ids
        words = []
        for piece in loaded.encode(text, add_special_tokens=False).tokens:
            words[-1:] = [words[-1] + piece[2:]] if piece.startswith("##") else [*words[-1:], piece]
        assert words == [w for w, _ in trained.pre_tokenizer.pre_tokenize_str(trained.normalizer.normalize_str(text))]
