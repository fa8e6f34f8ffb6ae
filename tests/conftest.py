"""Shared fixtures: tiny tokenizers and models built from fixture text, saved in the exact
Hugging Face layouts, so every test runs offline in seconds; and a tiny WARP job run once, whose
weights every other way of running it (killed and resumed, workers, torchrun) must give."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from nanowarp.config import parse_args
from nanowarp.models import save_policy
from nanowarp.models.gpt2 import GPT2, GPT2Classifier, GPT2ClassifierConfig, GPT2Config
from nanowarp.study import tiny
from nanowarp.tokenizer import EOS

pytest_plugins = ["pytester"]  # test_no_silent_skips.py runs a pytest session inside the suite's

# No silent skips: with CI set (.ci/run sets it), a test dependency that fails to import (pytest's
# importorskip: transformers, hypothesis, matplotlib, ...) fails the suite instead of skipping a module
# of parity tests in silence. A skip that is meant (an optional extra outside dev, a missing compiler)
# gives its own reason and stays a skip; the summary counts the skips and says why each happened.
MISSING = "could not import"


def _reason(report):
    return report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)


def _fail_missing_dependency(report):
    if os.environ.get("CI") and report.skipped and MISSING in _reason(report):
        report.outcome = "failed"
        report.longrepr = f"CI is set and a test dependency is missing, {_reason(report)}: make .venv/.installed-dev"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_missing_dependency(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_missing_dependency(outcome.get_result())


def pytest_terminal_summary(terminalreporter):
    skipped = terminalreporter.stats.get("skipped", [])
    terminalreporter.write_line(f"skipped: {len(skipped)}")
    for report in skipped:
        terminalreporter.write_line(f"  {report.nodeid or report.fspath}: {_reason(report)}")


# The test models are tiny: one thread runs them as fast as two, and far faster when the cores
# are busy with other work (thread oversubscription); it also fixes float reduction order.
torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Review-like text with what the real data has: <br /> tags, unicode, quotes, digits.
REVIEWS = [
    "This movie was absolutely wonderful, a joy from start to finish.<br /><br />The acting was superb.",
    "I hated every minute of it. The plot made no sense and the dialogue was wooden.",
    "A masterpiece of modern cinema! Beautiful cinematography, a haunting score, and great performances.",
    "Worst film I've seen this year. Don't waste your money on this garbage.",
    "The director's vision shines through: café scenes, naïve heroes, and a señor with a moustache.",
    "It's not great, it's not terrible; it's simply average. 5/10 would maybe watch again.",
    "Loved the characters and the story. My kids enjoyed it too. Highly recommended!",
    "Boring, predictable, too long. I fell asleep twice before the ending finally came.",
    "An emotional rollercoaster — I laughed, I cried, and I left the theater smiling.",
    "The special effects were cheap and the script was lazy. A total disappointment.",
    "Brilliant! One of the best films of the decade, with a stunning final act.",
    "Terrible acting, terrible writing, terrible everything. Avoid at all costs.",
    "Quietly moving and beautifully shot; the lead gives a career-best performance.",
    "Dull and lifeless. Even the music could not save this mess of a movie.",
    "\u00c9mile's \u201cfavorite\u201d scene 🎬 made the whole audience cheer and clap loudly.",
    "I expected more from such a talented cast, but the story never takes off.",
]


def bpe_folder(folder, layout="vocab"):
    """The fixture byte-level BPE (tiny.train_bpe on REVIEWS, 400 tokens) in one layout a checkpoint
    ships: 'vocab': vocab.json + merges.txt + special_tokens_map.json, as lvwerra/gpt2-imdb;
    'json': tokenizer.json alone."""
    tiny.train_bpe(REVIEWS, 400, folder, 128)
    drop = ("tokenizer.json", "tokenizer_config.json") if layout == "vocab" else \
        ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")
    for name in drop:
        os.remove(os.path.join(folder, name))
    return folder


def chat_checkpoint(src, folder, template):
    """A copy of the checkpoint src whose tokenizer_config.json holds the chat template `template`
    (EOS is its bos_token and eos_token)."""
    from nanowarp.hub import write_json
    shutil.copytree(src, folder, dirs_exist_ok=True)
    write_json(os.path.join(folder, "tokenizer_config.json"), {"chat_template": template, "bos_token": EOS,
                                                               "eos_token": EOS})
    return folder


def wordpiece_folder(folder, lowercase=True):
    """The fixture WordPiece (tiny.train_wordpiece on REVIEWS, 300 tokens) as BERT checkpoints ship
    it: vocab.txt + tokenizer_config.json (do_lower_case), no tokenizer.json."""
    tiny.train_wordpiece(REVIEWS, 300, folder, 512, lowercase)
    os.remove(os.path.join(folder, "tokenizer.json"))
    return folder


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory):
    """A byte-level BPE tokenizer in the vocab.json + merges.txt layout."""
    return bpe_folder(str(tmp_path_factory.mktemp("bpe")))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, bpe_dir):
    """A random 2-layer GPT-2 with the fixture tokenizer, saved in the Hugging Face layout."""
    folder = str(tmp_path_factory.mktemp("gpt2"))
    for name in os.listdir(bpe_dir):
        with open(os.path.join(bpe_dir, name), "rb") as src, open(os.path.join(folder, name), "wb") as dst:
            dst.write(src.read())
    vocab = json.load(open(os.path.join(bpe_dir, "vocab.json")))
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(vocab), n_positions=128, n_embd=32, n_layer=2, n_head=4,
                        bos_token_id=vocab[EOS], eos_token_id=vocab[EOS])
    GPT2(config).save_pretrained(folder)
    return folder


def gpt2_classifier(bpe_dir, n_positions=32, pad=True):
    """A random 1-layer GPT-2 sentiment classifier over the fixture BPE vocabulary (pad id: EOS)."""
    vocab = json.load(open(os.path.join(bpe_dir, "vocab.json")))
    torch.manual_seed(0)
    return GPT2Classifier(GPT2ClassifierConfig(
        vocab_size=len(vocab), n_positions=n_positions, n_embd=16, n_layer=1, n_head=2, bos_token_id=vocab[EOS],
        eos_token_id=vocab[EOS], pad_token_id=vocab[EOS] if pad else None, id2label={0: "NEGATIVE", 1: "POSITIVE"}))


@pytest.fixture(scope="session")
def judge_dir(bpe_dir, tmp_path_factory):
    """A random GPT-2 sentiment classifier with the fixture BPE tokenizer, in the Hugging Face layout."""
    folder = str(tmp_path_factory.mktemp("judge"))
    shutil.copytree(bpe_dir, folder, dirs_exist_ok=True)
    gpt2_classifier(bpe_dir, n_positions=128).save_pretrained(folder)
    return folder


def write_tiny_imdb(folder):
    """A tiny IMDB in the official layout, folder/aclImdb/{train,test}/{pos,neg}/ID_RATING.txt:
    6 reviews per folder (ids out of lexical order, two shorter than 200 characters, <br /> tags,
    unicode), plus the unlabelled train/unsup and a README, which readers must ignore.
    Returns {(split, label): [(id, text)] in file-creation order}."""
    written, k = {}, 0
    for split in ("train", "test"):
        for label, ratings in (("neg", (1, 2, 3, 4)), ("pos", (7, 8, 9, 10))):
            os.makedirs(os.path.join(folder, "aclImdb", split, label))
            written[split, label] = []
            for j, review_id in enumerate((10, 9, 0, 11, 2, 100)):
                base = REVIEWS[k % len(REVIEWS)]
                k += 1
                text = base if j in (1, 4) else f"{split} {label} {review_id}: " + "<br /><br />".join([base] * 3)
                name = f"{review_id}_{ratings[j % 4]}.txt"
                with open(os.path.join(folder, "aclImdb", split, label, name), "w", encoding="utf-8") as f:
                    f.write(text)
                written[split, label].append((review_id, text))
    os.makedirs(os.path.join(folder, "aclImdb", "train", "unsup"))
    with open(os.path.join(folder, "aclImdb", "train", "unsup", "5_0.txt"), "w") as f:
        f.write("unlabelled " * 40)
    with open(os.path.join(folder, "aclImdb", "README"), "w") as f:
        f.write("Large Movie Review Dataset (tiny test copy)\n")
    return written


@pytest.fixture(scope="session")
def imdb_dir(tmp_path_factory):
    """A folder holding a tiny aclImdb/ (see write_tiny_imdb)."""
    folder = str(tmp_path_factory.mktemp("imdb"))
    write_tiny_imdb(folder)
    return folder


@pytest.fixture(scope="session")
def prepared_imdb_dir(tmp_path_factory, imdb_dir, bpe_dir):
    """The output of nanowarp.data.prepare on the tiny IMDB with the fixture tokenizer:
    8 train prompts, 4 eval prompts (n_eval=4), 12 + 12 labelled reviews."""
    from nanowarp.data import prepare
    folder = str(tmp_path_factory.mktemp("imdb_prepared"))
    prepare(imdb_dir, bpe_dir, folder, n_eval=4, log=lambda *a: None)
    return folder


@pytest.fixture(scope="session")
def tiny_reward_dir(tmp_path_factory):
    """A random 2-layer DistilBERT sentiment classifier (labels NEGATIVE, POSITIVE) with a
    WordPiece tokenizer trained on REVIEWS, in the Hugging Face layout (vocab.txt)."""
    from nanowarp.models.distilbert import DistilBertClassifier, DistilBertConfig
    folder = wordpiece_folder(str(tmp_path_factory.mktemp("reward")))
    with open(os.path.join(folder, "vocab.txt"), encoding="utf-8") as f:
        vocab = [line.rstrip("\n") for line in f]
    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=len(vocab), max_position_embeddings=256, dim=32, n_layers=2, n_heads=4,
                              hidden_dim=64, pad_token_id=vocab.index("[PAD]"), id2label={0: "NEGATIVE", 1: "POSITIVE"})
    DistilBertClassifier(config).save_pretrained(folder)
    return folder


def perturbed_copy(src, dst, seed, scale=0.01):
    """A copy of the GPT-2 checkpoint src, tokenizer included, with N(0, scale²) noise added to
    every tensor: a stand-in for a fine-tuned policy."""
    g = torch.Generator().manual_seed(seed)
    model = GPT2.from_pretrained(src)
    theta = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in model.hf_state_dict().items()}
    save_policy(dst, theta, model.config, src)
    return dst


# ---- a tiny WARP job, for the crash-safety and parallelism tests --------------------------------
# The models above (GPT-2 and DistilBERT, 2 layers, width 32) and the tiny IMDB's prompts; I = 2,
# M = 2, 3 steps of batch 4, 8 new tokens, one CPU thread per process, so that every way of running
# it gives bit-identical weights.

ITERATIONS, RUNS, STEPS = 2, 2, 3


@pytest.fixture(scope="session")
def job_flags(tiny_gpt2_dir, tiny_reward_dir, prepared_imdb_dir):
    """The flags of the tiny job, without --out_dir."""
    return ["--policy", tiny_gpt2_dir, "--reward_model", tiny_reward_dir, "--data", prepared_imdb_dir,
            "--iterations", str(ITERATIONS), "--runs", str(RUNS), "--steps", str(STEPS), "--batch_size", "4",
            "--max_new_tokens", "8", "--lora_rank", "2", "--warmup", "1", "--lr", "1e-2", "--device", "cpu",
            "--threads", "1"]


def in_process(fn, *args):
    """Call fn here, giving back the thread count that --threads changes."""
    threads = torch.get_num_threads()
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def reference_job(job_flags, tmp_path_factory):
    """The job folder of the job run uninterrupted, sequentially, in this process (copy it to change it)."""
    from nanowarp.warp import warp
    out = str(tmp_path_factory.mktemp("reference"))
    in_process(warp, parse_args(job_flags + ["--out_dir", out]), None, lambda *a: None)
    return out


@pytest.fixture(scope="session")
def reference(reference_job, tiny_gpt2_dir):
    """The final θ_init (iter_I/liti) of the job run uninterrupted, sequentially, in this process."""
    theta = final_weights(reference_job)
    sft = load_file(os.path.join(tiny_gpt2_dir, "model.safetensors"))
    assert any(not torch.equal(theta[k], sft[k]) for k in theta), "the job must move the weights"
    return theta


class Killed(Exception):
    """Raised by stop_at where NANOWARP_KILL_AT would kill the process."""


def stop_at(monkeypatch, point):
    """The job raises Killed the first time it reaches the kill point `point` (nanowarp.jobs.folder.kill_point),
    where NANOWARP_KILL_AT=point would SIGKILL it: the same files on disk, without a process of its own."""
    import nanowarp.jobs.folder
    import nanowarp.jobs.job
    reached = []

    def kill_point(name):
        if name == point and not reached:
            reached.append(name)
            raise Killed(name)

    for module in (nanowarp.jobs.folder, nanowarp.jobs.job):
        monkeypatch.setattr(module, "kill_point", kill_point)


def train_py(args, env=None, timeout=300):
    """`python train.py args` in a subprocess (extra environment variables in env)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def final_weights(out_dir):
    return load_file(os.path.join(out_dir, f"iter_{ITERATIONS}", "liti", "model.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different}"


def leftovers(out_dir):
    """Temporary files, training states, and checkpoint folders without their config.json."""
    found = []
    for folder, subfolders, files in os.walk(out_dir):
        found += [os.path.join(folder, f) for f in files if f.startswith(".tmp") or f == "state.pt"]
        if folder != out_dir and not subfolders and "config.json" not in files:
            found.append(folder)
    return found


def chi_square_critical(dof, z=3.09):
    """Upper critical value of chi-square at alpha = 0.001 (z = 3.09), Wilson-Hilferty approximation."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
