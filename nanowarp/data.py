"""
The IMDB data of the WARP task: labelled reviews for the reward model, review openings as prompts.

Source: the Large Movie Review Dataset (Maas et al., 2011), `aclImdb/{train,test}/{pos,neg}/
{id}_{rating}.txt`. `read_imdb` reads it straight from the official `.tar.gz` (streamed, nothing
extracted to disk; every member is checked, and an archive holding links, devices, absolute
paths or `..` is refused), from an extracted folder, or from a URL (downloaded once to a cache).
`train/unsup` is ignored. Order, as in Hugging Face's `imdb` dataset: negatives (label 0) first,
then positives (label 1); inside a folder, by numeric review id (9_7.txt before 10_8.txt).

`prepare` writes, into one folder (each file atomically, meta.json last, byte-identical across runs):
  meta.json                       settings, counts, eos/pad token id
  prompts_train.npz, _eval.npz    tokens (int32, flat), offsets (int64, n+1), labels (int8)
  reviews_train.jsonl, _test.jsonl  {"label", "text"} per line: every labelled review, cleaned
Prompts: the cleaned reviews of at least `min_chars` characters, each cut to its first k tokens,
k drawn uniformly in [min_len, max_len]; eval prompts come from the first `n_eval` such test reviews
in eval order (`eval_order`): the reference's 100 first (the first 100, all negative), then positive
and negative reviews alike, so any first 200 + 2j eval prompts are half positive, half negative.
"""

import hashlib
import io
import json
import os
import re
import tarfile
import urllib.request
import zipfile

import numpy as np

from nanowarp.chat import chat_prompts
from nanowarp.hub import atomic_write, write_json, write_text
from nanowarp.logger import progress
# prompt files of any task, and the error of a dataset that cannot be read: nanowarp/prompts.py, named here too
from nanowarp.prompts import (DataError, PromptSet, encode_prompts, fit_prompts, load_prompt_dataset,  # noqa: F401
                              load_prompt_file)
from nanowarp.tokenizer import EOS, leading_special_ids, load_tokenizer

IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
KNOWN_MD5 = {IMDB_URL: "7c2ac02c03563afcf9b574c7e56c153a"}
LABELS = {"neg": 0, "pos": 1}  # also the order in which the folders are read
REVIEW = re.compile(r"aclImdb/(train|test)/(pos|neg)/([^/]+)")
PREFIX_CHARS = 256  # make_prompts encodes this much of each text (20 GPT-2 tokens are ~100 characters)


def download(url, cache_dir):
    """Fetch url into cache_dir (once: a file there is complete, being written atomically)."""
    path, md5 = os.path.join(cache_dir, os.path.basename(url)), KNOWN_MD5.get(url)
    if os.path.isfile(path) and md5 in (None, _md5(path)):
        return path

    def write(tmp):
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            total, done = int(response.headers.get("Content-Length") or 0), 0
            while chunk := response.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                of_total = f" / {total / 1e6:.1f} MB ({100 * done // total}%)" if total else " MB"
                print(f"\r  {done / 1e6:.1f}{of_total}", end="", flush=True)
            print()
        if total and done != total:
            raise DataError(f"download of {url} stopped after {done} of {total} bytes: try again")
        if md5 not in (None, _md5(tmp)):
            raise DataError(f"{url} downloaded with a wrong MD5 checksum: try again")

    print(f"downloading {url} to {path}")
    try:
        atomic_write(path, write)
    except OSError as e:  # urllib's URLError and HTTPError are OSErrors
        raise DataError(f"cannot download {url} ({e}): check your network, or pass a local copy") from None
    return path


def _md5(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_member(member, tar_path):
    """Refuse a tar member that could write outside the target folder or is not plain data."""
    name = member.name
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        raise DataError(f"refusing {tar_path}: member '{name}' has an absolute path")
    if ".." in name.replace("\\", "/").split("/"):
        raise DataError(f"refusing {tar_path}: member '{name}' has a '..' component")
    if not (member.isfile() or member.isdir()):
        kind = "a link" if member.issym() or member.islnk() else "a device or special file"
        raise DataError(f"refusing {tar_path}: member '{name}' is {kind}")


def safe_extract(tar_path, dest):
    """Extract a .tar.gz into dest, after checking every member (read_imdb does not need this)."""
    with _open_tar(tar_path) as tar:
        members = tar.getmembers()
        for member in members:
            check_member(member, tar_path)
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.11.4 / 3.10.12
        tar.extractall(dest, members=members, **safe)


def _open_tar(tar_path, mode="r:*"):
    try:
        return tarfile.open(tar_path, mode)
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"cannot read {tar_path} as a tar archive ({e})") from None


def _files_in_tarball(tar_path):
    """Yield (relative name, bytes) of every review file, streaming the archive in one pass."""
    with _open_tar(tar_path, "r|*") as tar:
        try:
            for member in tar:
                check_member(member, tar_path)
                name = member.name.removeprefix("./")
                if member.isfile() and REVIEW.fullmatch(name):
                    yield name, tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"{tar_path} is corrupt or truncated ({e}): download it again") from None


def _files_in_folder(folder):
    root = os.path.join(folder, "aclImdb") if os.path.isdir(os.path.join(folder, "aclImdb")) else folder
    for split in ("train", "test"):
        for label in LABELS:
            sub = os.path.join(root, split, label)
            if not os.path.isdir(sub):
                raise DataError(f"{folder} has no folder {split}/{label}: expected the official layout "
                                f"aclImdb/{{train,test}}/{{pos,neg}}/ID_RATING.txt")
            for filename in os.listdir(sub):
                with open(os.path.join(sub, filename), "rb") as f:
                    yield f"aclImdb/{split}/{label}/{filename}", f.read()


def read_imdb(source, cache_dir="data/imdb/cache"):
    """{'train': [(text, label)], 'test': [...]} from a .tar.gz, a folder or a URL (see the docstring)."""
    source = os.fspath(source)
    if re.match(r"[a-z]+://", source):  # https://, http://, file://
        source = download(source, cache_dir)
    if os.path.isdir(source):
        files = _files_in_folder(source)
    elif os.path.isfile(source):
        files = _files_in_tarball(source)
    else:
        raise DataError(f"no IMDB data at {source}: pass the aclImdb_v1.tar.gz archive, the folder it "
                        f"extracts to, or a URL")
    found = {(split, label): [] for split in ("train", "test") for label in LABELS}
    for name, raw in progress(files, f"reading {os.path.basename(source.rstrip('/'))}", total=50000, unit="review"):
        split, label, filename = REVIEW.fullmatch(name).groups()
        if filename.startswith("."):  # .DS_Store and the like
            continue
        match = re.fullmatch(r"(\d+)_(\d+)\.txt", filename)
        if match is None:
            raise DataError(f"unexpected file {name} in {source}: review files are named ID_RATING.txt")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{name} in {source} is not UTF-8 text ({e})") from None
        found[split, label].append((int(match[1]), int(match[2]), text))
    data = {}
    for split in ("train", "test"):
        data[split] = []
        for label, y in LABELS.items():
            if not found[split, label]:
                raise DataError(f"no reviews in aclImdb/{split}/{label} of {source}: is it the IMDB archive?")
            data[split] += [(text, y) for _, _, text in sorted(found[split, label])]
    return data


def clean(text):
    """Replace the HTML line breaks of the reviews by spaces and collapse whitespace."""
    return " ".join(re.sub(r"<br\s*/?>", " ", text, flags=re.IGNORECASE).split())


def make_prompts(texts, tokenizer, min_len=5, max_len=20, seed=0):
    """The first k tokens of each text, k ~ U{min_len..max_len} drawn per text (seeded), after the
    BOS the tokenizer puts first, if any (tokenizer.leading_special_ids)."""
    lengths = np.random.default_rng(seed).integers(min_len, max_len + 1, size=len(texts)).tolist()
    # Only the opening is kept, so encode the first PREFIX_CHARS characters (whole reviews take
    # 10x longer). Cutting a text can change only its last two pre-tokenized words; where a kept
    # token may belong to those, encode the whole text instead. The result is exact either way.
    heads = tokenizer.encode_batch([t[:PREFIX_CHARS] for t in texts], add_special_tokens=False)
    prompts, bos = [], leading_special_ids(tokenizer)
    for text, head, k in zip(texts, heads, lengths):
        words = head.word_ids
        exact = len(text) <= PREFIX_CHARS or (len(words) > k and None not in (words[k - 1], words[-1])
                                              and words[k - 1] < words[-1] - 1)
        prompts.append(bos + (head if exact else tokenizer.encode(text, add_special_tokens=False)).ids[:k])
    return prompts


def eval_order(reviews, n_reference=100):
    """Test reviews (sorted by label, negatives first) in the order eval prompts are taken: the
    first `n_reference` (the reference's eval set: all negative), the first `n_reference`
    positives, then one positive and one negative at a time."""
    neg = [r for r in reviews if r[1] == 0]
    pos = [r for r in reviews if r[1] == 1]
    head, rest_neg, rest_pos = neg[:n_reference] + pos[:n_reference], neg[n_reference:], pos[n_reference:]
    alternating = [r for pair in zip(rest_pos, rest_neg) for r in pair]
    n = len(alternating) // 2
    return head + alternating + rest_pos[n:] + rest_neg[n:]


def _pack(prompts, labels):
    offsets = np.cumsum([0] + [len(p) for p in prompts], dtype=np.int64)
    tokens = np.array([t for p in prompts for t in p], dtype=np.int32)
    return {"tokens": tokens, "offsets": offsets, "labels": np.array(labels, dtype=np.int8)}


def _write_npz(path, arrays):
    """np.savez without the timestamps that make its files differ from run to run."""
    def write(tmp):
        with zipfile.ZipFile(tmp, "w") as z:
            for name, array in arrays.items():
                buffer = io.BytesIO()
                np.lib.format.write_array(buffer, array, allow_pickle=False)
                z.writestr(zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0)), buffer.getvalue())
    atomic_write(path, write)


def prepare(source, tokenizer_name_or_dir, out_dir, seed=0, min_chars=200, n_eval=100, min_len=5, max_len=20,
            cache_dir="data/imdb/cache", log=print):
    """Read IMDB, build the prompt and review files in out_dir (see the module docstring); return meta."""
    if not 1 <= min_len <= max_len or n_eval < 1 or min_chars < 0:
        raise DataError(f"need 1 <= min_len <= max_len, n_eval >= 1, min_chars >= 0; "
                        f"got min_len={min_len}, max_len={max_len}, n_eval={n_eval}, min_chars={min_chars}")
    tokenizer = load_tokenizer(tokenizer_name_or_dir)
    data = {split: [(clean(text), y) for text, y in reviews] for split, reviews in read_imdb(source, cache_dir).items()}
    kept = {split: [(t, y) for t, y in reviews if len(t) >= min_chars] for split, reviews in data.items()}
    kept["eval"] = eval_order(kept.pop("test"))[:n_eval]
    packed, counts = {}, {}
    for split in ("train", "eval"):
        if not kept[split]:
            raise DataError(f"no {split} prompts left: no review has at least min_chars={min_chars} characters")
        texts, labels = zip(*kept[split])
        prompts = make_prompts(texts, tokenizer, min_len, max_len, seed)
        packed[split] = _pack(prompts, labels)
        counts[f"prompts_{split}"] = len(prompts)
    for split, reviews in data.items():
        counts[f"reviews_{split}"] = len(reviews)
        counts[f"reviews_{split}_kept"] = sum(len(t) >= min_chars for t, _ in reviews)
        log(f"{split}: {len(reviews)} reviews, {counts[f'reviews_{split}_kept']} with >= {min_chars} characters")
    log(f"prompts: {counts['prompts_train']} train, {counts['prompts_eval']} eval")
    eos = tokenizer.token_to_id(EOS)  # None for a tokenizer without it
    meta = {"source": os.fspath(source), "tokenizer": os.fspath(tokenizer_name_or_dir), "seed": seed,
            "min_chars": min_chars, "n_eval": n_eval, "min_prompt_len": min_len, "max_prompt_len": max_len,
            "counts": counts, "eos_token_id": eos, "pad_token_id": eos}
    for split in ("train", "eval"):
        _write_npz(os.path.join(out_dir, f"prompts_{split}.npz"), packed[split])
    for split, reviews in data.items():
        rows = [json.dumps({"label": y, "text": t}, ensure_ascii=False, sort_keys=True) + "\n" for t, y in reviews]
        write_text(os.path.join(out_dir, f"reviews_{split}.jsonl"), "".join(rows))
    write_json(os.path.join(out_dir, "meta.json"), meta, sort_keys=True)
    log(f"wrote meta.json, prompts_{{train,eval}}.npz, reviews_{{train,test}}.jsonl to {out_dir}")
    return meta


def _existing(data_dir, filename):
    path = os.path.join(data_dir, filename)
    if not os.path.isfile(path):
        raise DataError(f"no {filename} in {data_dir}: run `python data/imdb/prepare.py --out {data_dir}` first")
    return path


def load_meta(data_dir):
    with open(_existing(data_dir, "meta.json"), encoding="utf-8") as f:
        return json.load(f)


def load_prompts(data_dir, split):
    """The prompts of split 'train' or 'eval', as lists of token ids."""
    assert split in ("train", "eval"), split
    with np.load(_existing(data_dir, f"prompts_{split}.npz")) as z:
        tokens, offsets = z["tokens"].tolist(), z["offsets"].tolist()
    return [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def load_prepared_prompts(data_dir, split, tokenizer, template=None, chat=False, max_tokens=None, truncate="none",
                          limit=None):
    """load_prompts' prompts (the first `limit`), as load_prompt_dataset treats a file's: with `chat`
    (--chat_template) each the user's turn of `template`'s chat template, then each fitting
    max_tokens or named by its number (prompts.fit_prompts)."""
    prompts = load_prompts(data_dir, split)[:limit]
    if chat:
        prompts = chat_prompts(prompts, tokenizer, template)
    path = os.path.join(data_dir, f"prompts_{split}.npz")
    return fit_prompts(prompts, max_tokens, truncate, lambda i: f"{path}, prompt {i + 1}",
                       leading_special_ids(tokenizer))


def load_reviews(data_dir, split):
    """The cleaned labelled reviews of split 'train' or 'test': (texts, labels)."""
    assert split in ("train", "test"), split
    with open(_existing(data_dir, f"reviews_{split}.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [r["text"] for r in rows], [r["label"] for r in rows]
