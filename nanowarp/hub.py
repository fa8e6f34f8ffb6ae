"""
Finding, reading and writing checkpoints in the Hugging Face layout.

A checkpoint is a folder with `config.json` and `model.safetensors` (or the older pickled
`pytorch_model.bin`), plus whatever tokenizer files the model ships. `resolve` accepts a local
folder or a Hub id ("lvwerra/gpt2-imdb"); Hub ids go through `huggingface_hub`, so its cache,
`HF_HUB_OFFLINE=1` and tokens work as usual.

Every error a user can cause (wrong path, offline, corrupt file) is a `CheckpointError` whose
message says what was wrong and what to do. Every write is atomic (a temporary file renamed), and a
full disk is a `DiskFullError` that says where and how much space the file needs. A checkpoint folder
written here ends with a checksums.sha256 (nanowarp/checksums.py), and one that has it is verified on load.
"""

import dataclasses
import errno
import json
import os
import pathlib
import re
import tempfile
import typing

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from nanowarp import checksums
from nanowarp.memory import converted, read_safetensors

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # in order of preference
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "vocab.txt")


class CheckpointError(Exception):
    """A checkpoint that cannot be found or read, with a message meant for the user."""


class DiskFullError(OSError):
    """A write that failed for want of space (ENOSPC, a quota, a file-size limit); the message says
    where, how much the file needed, and what to do. The file was not written, nor any part of it."""


DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def format_size(n):
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000


def _is_hub_id(name):
    return re.fullmatch(r"[\w\-]+(/[\w\-.]+)?", name) is not None


def resolve(name_or_path, weights=True, revision=None):
    """Return a local folder holding `config.json` (and the weights, if `weights`) of a checkpoint: a
    local folder as it is; anything else of the form "owner/name" is a Hub id, whose files are
    fetched into (or read from) the huggingface_hub cache."""
    name_or_path = os.fspath(name_or_path)
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path):
        raise CheckpointError(f"{name_or_path} is a file; expected a checkpoint folder "
                              f"(with config.json and model weights) or a Hub id like 'owner/name'")
    if not _is_hub_id(name_or_path) or os.path.isdir(name_or_path.split("/")[0]):
        # "runs/x" where runs/ exists here is a missing local folder, not a Hub repo to retry for
        raise CheckpointError(f"no checkpoint folder at {name_or_path}: the folder does not exist "
                              f"(a Hub id has the form 'owner/name')")
    return _download(name_or_path, weights, revision)


def _download(repo_id, weights, revision):
    """The cache folder of a Hub repo: from the local cache alone when it holds config.json, the
    weights (if asked for) and a tokenizer; otherwise after one request for the repo's file list,
    fetching only the files the repo has. Without a network, each request for a file costs retries
    (~23 s each), so the cache is read first and the Hub asked once, not once per candidate file."""
    from huggingface_hub import HfApi, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    def cached(filename):
        path = try_to_load_from_cache(repo_id, filename, revision=revision)
        return path if isinstance(path, str) else None  # None, or the "known missing" marker

    def fail(e, what):
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = ("HF_HUB_OFFLINE is set and the file is not in the local cache: download it once with "
                "a network, or pass a local folder" if offline else
                "check the id and your network, or pass a local folder")
        raise CheckpointError(f"'{repo_id}' is no local folder, and {what} could not be fetched from the "
                              f"Hugging Face Hub ({type(e).__name__}): {hint}") from None

    config = cached("config.json")
    has_weights = not weights or any(cached(f) for f in WEIGHT_FILES + (INDEX,))
    has_tokenizer = any(cached(f) for f in ("tokenizer.json", "vocab.json", "vocab.txt"))
    if config and has_weights and has_tokenizer:
        return os.path.dirname(config)
    try:
        files = set(HfApi().list_repo_files(repo_id, revision=revision))  # the one request
    except (OfflineModeIsEnabled, RepositoryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        if config and has_weights:
            return os.path.dirname(config)  # no tokenizer in the cache: loading it will say so
        if config:
            raise CheckpointError(f"'{repo_id}': config.json is in the local cache but its weights "
                                  f"({' or '.join(WEIGHT_FILES)}) are not in the local cache (offline): the Hub "
                                  f"could not be reached ({type(e).__name__}); download them once with a network, "
                                  f"or pass a local folder") from None
        fail(e, "its config.json")
    if "config.json" not in files:
        raise CheckpointError(f"'{repo_id}' on the Hub has no config.json: is it a Hugging Face model repo?")
    wanted = ["config.json"]
    if weights:
        present = [f for f in WEIGHT_FILES if f in files]
        if not present and INDEX in files:  # sharded: the index and every shard
            present = [INDEX] + sorted(f for f in files if SHARD.fullmatch(f))
        if not present:
            raise CheckpointError(f"'{repo_id}' on the Hub has none of {', '.join(WEIGHT_FILES + (INDEX,))}")
        wanted += present if present[0] == INDEX else present[:1]
    wanted += [f for f in TOKENIZER_FILES + ("generation_config.json",) if f in files]  # whichever the repo ships
    try:
        paths = [cached(f) or hf_hub_download(repo_id, f, revision=revision) for f in wanted]
    except (OfflineModeIsEnabled, HfHubHTTPError, OSError, ValueError) as e:
        fail(e, "its files")
    return os.path.dirname(paths[0])


def load_config(folder):
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder} has no config.json: is it a Hugging Face checkpoint folder?")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return config


def check_config(cls, d, where, sizes):
    """Raise CheckpointError naming `where` (a config.json) unless every field of the dataclass `cls`
    that the dict `d` sets has a value of the field's type, and the fields `sizes` are at least 1:
    a damaged config.json must not build a model of another size, or of none."""
    for f in dataclasses.fields(cls):
        value = d.get(f.name)
        kinds = typing.get_args(f.type) or (f.type,)  # int | None -> (int, NoneType)
        if value is None or (type(value) in kinds or (float in kinds and type(value) is int)):
            if f.name in sizes and value is not None and value < 1:
                raise CheckpointError(f"{f.name}={value} in {where} is not a size (at least 1)")
            continue
        names = " or ".join(k.__name__ for k in kinds if k is not type(None))
        raise CheckpointError(f"{f.name}={json.dumps(value)[:40]} in {where} is not of type {names}")


def check_size(folder, n_weights, where):
    """Raise CheckpointError unless the weights file of the folder can hold `n_weights` weights (at
    least a byte each), which its config.json (`where`) promises: before any memory is allocated."""
    files = [os.path.join(folder, f) for f in weight_files(folder)]  # one file, or an index and its shards
    size = sum(os.path.getsize(f) for f in files)
    if files and n_weights > size:
        held = files[0] if len(files) == 1 else f"the weight files of {folder}"
        raise CheckpointError(f"{where} describes a model of {n_weights:,} weights or more, which {held} "
                                  f"({format_size(size)}) cannot hold: they do not belong together")


def verify(folder):
    """Raise CheckpointError, naming the file, if a file of the folder differs from its checksums.sha256."""
    refuse(checksums.problem(folder))


def refuse(problem):  # a checksums.problem's message, if it found one, raised as a CheckpointError
    if problem:
        raise CheckpointError(problem)


def seal(folder):
    """Write the folder's checksums.sha256, once every other file of the checkpoint is written."""
    write_text(os.path.join(folder, checksums.NAME), checksums.listing(folder))


def load_state_dict(folder, dtype=None):
    """Read the weights of a checkpoint folder: (state_dict, path of the file read), each tensor into
    memory of its own, converted to `dtype` (when given) as it is read; the checksums are computed beside
    the read and checked before anything is returned or another error raised (an interrupt waits for nothing)."""
    problem = checksums.problem_in_background(folder)
    try:
        loaded = _read_weights(folder, dtype)
    except Exception:
        refuse(problem())  # a file differing from its checksums is the error to report
        raise
    refuse(problem())
    return loaded


def _read_weights(folder, dtype):
    if os.path.isfile(os.path.join(folder, INDEX)):
        return load_sharded(folder, dtype)
    path = next((p for p in (os.path.join(folder, f) for f in WEIGHT_FILES) if os.path.isfile(p)), None)
    if path is None:
        raise CheckpointError(f"{folder} holds no weights: expected one of {', '.join(WEIGHT_FILES)}")
    try:
        if path.endswith(".safetensors"):
            return read_safetensors(path, dtype), path
        # .bin files are pickles: never let them run code
        return converted(torch.load(path, map_location="cpu", weights_only=True), dtype), path
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: the file is corrupt or truncated ({e}); "
                              f"download or save it again") from None


def check_readable(folder):
    """Raise CheckpointError unless the checkpoint's config.json parses and its weights file is whole
    (a safetensors header that agrees with the file's length), and every file matches its checksums.sha256."""
    verify(folder)
    load_config(folder)
    if os.path.isfile(os.path.join(folder, INDEX)):
        check_sharded(folder)
        return
    path = os.path.join(folder, WEIGHT_FILES[0])
    if not os.path.isfile(path):
        _read_weights(folder, None)  # a .bin, read whole, or none
        return
    try:
        with safe_open(path, "pt") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {path}: the file is corrupt or truncated ({e})") from None


def check_keys(expected, found, path, new_ok=()):
    """Compare parameter shapes (dicts name -> shape, or -> tensor: then its dtype must be a floating
    point one); raise a CheckpointError naming the first problem. Keys in `new_ok` may be missing
    (they keep their fresh initialisation)."""
    # a config.json that disagrees with the weights shows as their keys or shapes: name it too
    config = os.path.join(os.path.dirname(str(path)), "config.json")
    for name, shape in found.items():
        if name not in expected:
            raise CheckpointError(f"unexpected key '{name}' in {path}: the model built from {config} has no such weight")
        if isinstance(shape, torch.Tensor):
            if not shape.is_floating_point():
                raise CheckpointError(f"'{name}' in {path} holds {shape.dtype} numbers: expected floating-point weights")
            shape = shape.shape
        if tuple(expected[name]) != tuple(shape):
            raise CheckpointError(f"shape mismatch for '{name}' in {path}: the file has {tuple(shape)}, "
                                  f"the model built from {config} expects {tuple(expected[name])}")
    missing = [name for name in expected if name not in found and name not in new_ok]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"missing key '{missing[0]}'{more} in {path}, which the model built from {config} has")


def atomic_write(path, write, size=None):
    """Call write(tmp_path), then rename tmp_path to path: readers never see a partial file. A write
    that fails for want of space removes its temporary file and raises DiskFullError, which names
    the folder and the file's `size` (bytes, when known)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
    os.close(fd)
    if checksums.lists(folder, os.path.basename(path)):  # a file it vouches for changes: unverified until sealed
        os.remove(os.path.join(folder, checksums.NAME))
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make every checkpoint private
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # again: a writer that replaces the file (safetensors) makes it 0600
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            space = f"at least {format_size(size)}" if size is not None else "some space"
            raise DiskFullError(e.errno, f"cannot write {os.path.basename(path)} to {folder}: {e.strerror} (the disk "
                                f"is full, or a quota or file-size limit is reached). Nothing of it was written and "
                                f"every file written before is intact: free {space} there (the size of this file), "
                                f"then run the same command again") from None
        raise


def write_bytes(path, data):
    """Write bytes to path atomically (serialise in memory first, so that a full disk is an OSError
    with its errno, which the libraries' own file writers do not keep)."""
    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_bytes(data), size=len(data))


def write_text(path, text):
    """Write text (UTF-8, "\n" line ends) to path atomically."""
    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(text, encoding="utf-8", newline="\n"))


def write_json(path, obj, sort_keys=False):
    """Write obj as indented JSON to path atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def save_checkpoint(folder, config, state_dict):
    """Write model.safetensors, config.json (both atomically), then checksums.sha256 of the folder."""
    state_dict = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    write_bytes(os.path.join(folder, "model.safetensors"), save(state_dict, metadata={"format": "pt"}))
    write_json(os.path.join(folder, "config.json"), config, sort_keys=True)
    seal(folder)


# ---- sharded checkpoints: model.safetensors.index.json and the shards it names -----------------
# (what transformers writes for large models: model-00001-of-00003.safetensors, ... and an index
# {"metadata": {"total_size": bytes}, "weight_map": {tensor name: shard file}})

INDEX = "model.safetensors.index.json"
SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
MAX_SHARD_BYTES = 5 * 10**9  # transformers 4.x's default max_shard_size, "5GB"


def read_index(folder):
    """(path of the index, {tensor name: shard file}) of a sharded checkpoint whose shards are all there."""
    path = os.path.join(folder, INDEX)
    try:
        with open(path) as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a valid index of shards ({e}); download or save it again") from None
    for shard in sorted(set(weight_map.values())):
        if not os.path.isfile(os.path.join(folder, shard)):
            raise CheckpointError(f"{path} names the shard {shard}, which is not in {folder}: download it again")
    return path, weight_map


def check_sharded(folder):
    """check_readable for a sharded checkpoint: the index, and each shard's header against its file."""
    _, weight_map = read_index(folder)
    for shard in sorted(set(weight_map.values())):
        try:
            with safe_open(os.path.join(folder, shard), "pt") as f:
                f.keys()
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {os.path.join(folder, shard)}: the file is corrupt or truncated "
                                  f"({e})") from None


def load_sharded(folder, dtype=None):
    """The weights of a sharded checkpoint, read shard by shard (load_state_dict): (state_dict, path of the index)."""
    path, weight_map = read_index(folder)
    state_dict = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(folder, shard)
        try:
            state_dict.update(read_safetensors(shard_path, dtype, {k for k, v in weight_map.items() if v == shard}))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {shard_path}: the file is corrupt or truncated ({e}); "
                                  f"download or save it again") from None
    missing = [k for k in weight_map if k not in state_dict]
    if missing:
        raise CheckpointError(f"{path} names '{missing[0]}' in {weight_map[missing[0]]}, which does not hold it")
    return state_dict, path


def weight_files(folder):
    """The weight files in a checkpoint folder: single-file, pickled, or an index and its shards."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(f for f in names if f in WEIGHT_FILES or f == INDEX or SHARD.fullmatch(f))


def save_weights(folder, config, state_dict, max_shard_bytes=MAX_SHARD_BYTES):
    """save_checkpoint, or above max_shard_bytes of weights, shards of at most that size (a larger
    tensor alone in its shard) and their index, then config.json. Weight files of another layout
    left in the folder by an earlier save are removed, so that loading never mixes the two; checksums.sha256
    last."""
    state_dict = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    if os.path.exists(os.path.join(folder, checksums.NAME)):  # the files change, and some may go: unverified
        os.remove(os.path.join(folder, checksums.NAME))       # until sealed again
    total = sum(v.numel() * v.element_size() for v in state_dict.values())
    if total <= max_shard_bytes:
        written = ["model.safetensors"]
        write_bytes(os.path.join(folder, "model.safetensors"), save(state_dict, metadata={"format": "pt"}))
    else:
        shards, size = [{}], 0
        for k, v in state_dict.items():
            nbytes = v.numel() * v.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k] = v
            size += nbytes
        written, weight_map = [INDEX], {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            write_bytes(os.path.join(folder, name), save(shard, metadata={"format": "pt"}))
            written.append(name)
            weight_map.update({k: name for k in shard})
        write_json(os.path.join(folder, INDEX), {"metadata": {"total_size": total}, "weight_map": weight_map})
    for stale in set(weight_files(folder)) - set(written):
        os.remove(os.path.join(folder, stale))
    write_json(os.path.join(folder, "config.json"), config, sort_keys=True)
    seal(folder)
