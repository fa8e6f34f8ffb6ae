"""
checksums.sha256: a checkpoint folder that proves its bytes.

Every checkpoint folder nanowarp writes ends with a `checksums.sha256` in the format of coreutils'
`sha256sum` (one `<64 hex digits>  <file name>` line per file), so `sha256sum -c checksums.sha256`
checks it by hand. It lists every file of the folder as it was when the checkpoint was complete, except
the training state (state.pt), temporary files (.tmp-*) and what was set aside (*.damaged); it is
written last, after config.json (hub.seal).

Crash safety: a file it lists is never replaced while it stands. Before nanowarp rewrites such a file,
it removes checksums.sha256 (hub.atomic_write), and writes it again once the folder is complete: a
crash in between leaves a folder without checksums, which loads unverified, never one whose checksums
are wrong. A folder without checksums.sha256 (a download from the Hub, an older nanowarp) loads as before.

This module only reads files; nanowarp/hub.py writes checksums.sha256 and turns a `problem` into a
CheckpointError.
"""

import hashlib
import os
import re
import threading

NAME = "checksums.sha256"
UNLISTED = ("state.pt", "state.pt.sha256", NAME)  # a training state changes, and goes, after the folder is done
LINE = re.compile(r"([0-9a-fA-F]{64}) [ *]([^/\\]+)")  # sha256sum's text (" ") or binary ("*") mode


def sha256(path, chunk=1 << 24):
    """The SHA-256 of a file's bytes, as 64 hex digits (read 16 MiB at a time)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def listed_files(folder):
    """The files of `folder` that its checksums.sha256 would list now, sorted."""
    return sorted(name for name in os.listdir(folder) if os.path.isfile(os.path.join(folder, name))
                  and name not in UNLISTED and not name.startswith(".") and ".damaged" not in name)


def listing(folder, names=None):
    """The text of checksums.sha256 for the files of `folder` as they are now (or for `names` alone)."""
    return "".join(f"{sha256(os.path.join(folder, name))}  {name}\n" for name in names or listed_files(folder))


def read(folder, sums_file=NAME):
    """{file name: hex digest} of the folder's checksums.sha256 (or `sums_file`); {} without one. A file
    that is not in sha256sum's format raises ValueError, naming it and the line."""
    path = os.path.join(folder, sums_file)
    if not os.path.isfile(path):
        return {}
    with open(path, "rb") as f:
        data = f.read(1 << 20)  # a real one is ~100 bytes per file
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is damaged: not UTF-8 text") from None
    sums = {}
    for n, line in enumerate(lines, 1):
        match = LINE.fullmatch(line)
        if match is None or match[2] in (".", ".."):
            raise ValueError(f"{path} is damaged: line {n} is not '<64 hex digits>  <file name>' ({line[:80]!r})")
        sums[match[2]] = match[1].lower()
    return sums


def problem(folder, sums_file=NAME):
    """Why the folder's files do not match its checksums.sha256 (or `sums_file`): a message naming the
    first file that differs or is missing; or None: they match, or there is no such file."""
    try:
        sums = read(folder, sums_file)
    except ValueError as e:
        return f"{e}; delete it to load the folder unverified, or restore the folder from a copy"
    for name, expected in sums.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{path} is missing: {os.path.join(folder, sums_file)} lists it"
        if sha256(path) != expected:
            return (f"{path} is damaged: its bytes differ from those it was saved with "
                    f"({os.path.join(folder, sums_file)} holds their SHA-256); save it again, or restore it from a copy")
    return None


def problem_in_background(folder):
    """Start `problem(folder)` in a thread of its own (hashlib lets go of the GIL: the hashing runs
    beside whatever the caller does) and return a function that waits for it and gives its result, or
    raises what it raised. A daemon thread: an interrupted caller does not wait for the hashing to end."""
    outcome = []

    def run():
        try:
            outcome.append(problem(folder))
        except BaseException as e:  # handed to the caller
            outcome.append(e)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def result():
        thread.join()
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]
    return result


def lists(folder, name):
    """Whether the folder's checksums.sha256 lists the file `name` (or is damaged: it may)."""
    try:
        return name != NAME and name in read(folder)
    except (ValueError, OSError):
        return True
