"""
Prompt datasets of any task (--prompts): the prompts a policy is trained, evaluated or sampled on,
and the other fields of their rows, which reward functions read as columns.

Formats, by the file's name: `.jsonl` (an object per line), `.json` (a list of objects), `.parquet`
(a table; pyarrow, the `parquet` extra, imported only then), anything else plain text, a prompt per
line. A row's prompt is its "prompt" field (--prompt_key names another), a string, or else its
"messages", a conversation rendered by the policy's chat template (system and earlier turns kept,
the assistant's turn opened, as transformers' apply_chat_template(..., add_generation_prompt=True));
every other field is a column. Every prompt's length is checked when it is loaded, against the
context the policy leaves beside --max_new_tokens (--truncate_prompts left keeps its last tokens).
Every error names the file and the line (or row).
"""

import json
import os
from dataclasses import dataclass

from nanowarp import hub
from nanowarp.chat import renderer
from nanowarp.tokenizer import leading_special_ids


class DataError(Exception):
    """A dataset that cannot be found or read, with a message meant for the user."""


@dataclass
class PromptSet:
    """The prompts of a dataset, and the other fields of its rows."""
    ids: list  # each prompt's token ids in the policy's tokenizer (BOS first where it puts one)
    prompts: list  # each prompt's text: as written, or its conversation as the chat template renders it
    columns: dict  # every other field of the rows, by name: lists aligned with prompts ({} for text files)


def max_prompt_tokens(n_positions, max_new_tokens):
    """The longest prompt a context of n_positions tokens leaves room for beside --max_new_tokens."""
    if max_new_tokens >= n_positions:
        raise DataError(f"--max_new_tokens {max_new_tokens} leaves no room for a prompt in the policy's context of "
                        f"{n_positions} tokens: lower it")
    return n_positions - max_new_tokens


def fit_prompts(prompts, max_tokens, truncate, where, bos=()):
    """Prompts (lists of token ids) of at most max_tokens tokens each, checked before any training, so
    that none fails when it is first drawn: a longer one is a DataError naming where(i) (its file and
    line), or with truncate="left" (--truncate_prompts left) keeps its last tokens, after the BOS
    `bos` it starts with. max_tokens None: no check."""
    assert truncate in ("none", "left"), truncate
    fitted = []
    for i, ids in enumerate(prompts):
        if max_tokens is not None and len(ids) > max_tokens:
            if truncate == "none":
                raise DataError(f"{where(i)}: the prompt has {len(ids)} tokens, more than the {max_tokens} the "
                                f"policy's context leaves beside --max_new_tokens: shorten it, lower --max_new_tokens, "
                                f"or pass --truncate_prompts left to keep its last {max_tokens} tokens")
            head = list(bos) if ids[:len(bos)] == list(bos) and len(bos) < max_tokens else []
            ids = head + ids[len(ids) - (max_tokens - len(head)):]
        fitted.append(ids)
    return fitted


def read_rows(path, prompt_key="prompt"):
    """The rows of a prompt dataset as [(where, row)]: `where` names the file and line (or row), each
    row a dict. .jsonl: an object per line; .json: a list of objects; .parquet: a table (pyarrow);
    any other name: plain text, a prompt per line, as {prompt_key: line}. Blank lines are skipped."""
    if not os.path.isfile(path):
        raise DataError(f"no prompt file at {path}: give a text file (one prompt per line), .jsonl, .json or "
                        f".parquet (a \"prompt\" field per row)")
    if path.endswith(".parquet"):
        return _read_parquet(path)
    with open(path, encoding="utf-8") as f:
        try:
            text = f.read()  # universal newlines: \r\n and \r read as \n
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text ({e}): save it as UTF-8") from None
    if path.endswith(".json"):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {e.lineno}: not JSON ({e.msg})") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a list of objects, got {type(rows).__name__}")
        return [(f"{path}, row {n}", row) for n, row in enumerate(rows, 1)]
    rows = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        if path.endswith(".jsonl"):
            try:
                line = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {n}: not JSON ({e})") from None
        rows.append((f"{path}, line {n}", line if path.endswith(".jsonl") else {prompt_key: line}))
    return rows


def _read_parquet(path):
    try:
        import pyarrow.parquet  # the parquet extra, imported only for a .parquet file
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow, which is not installed: pip install pyarrow "
                        f"(or nanowarp[parquet])") from None
    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(f"cannot read {path} as a Parquet table ({e})") from None
    return [(f"{path}, row {n}", row) for n, row in enumerate(rows, 1)]


def split_rows(rows, path, prompt_key="prompt"):
    """(wheres, prompts, columns) of rows read by read_rows: a row's prompt is its `prompt_key` field, a
    string or a conversation (a list of {"role": str, "content": str}, as TRL's conversational
    datasets hold it), else its "messages", a conversation; the first row decides which. Every other
    field is a column: every row has the first one's fields."""
    if not rows:
        raise DataError(f"{path} holds no prompts")
    first = rows[0][1] if isinstance(rows[0][1], dict) else {}
    key = prompt_key if prompt_key in first or "messages" not in first else "messages"
    kind = "list of messages" if key == "messages" else "string"
    fields = list(first)
    prompts, columns = [], {name: [] for name in fields if name != key}
    for where, row in rows:
        if not isinstance(row, dict) or key not in row:
            raise DataError(f"{where}: expected an object with a \"{key}\" {kind}" +
                            (" (--prompt_key names another field) or a \"messages\" list" if key == prompt_key else ""))
        missing, extra = [f for f in fields if f not in row], [f for f in row if f not in fields]
        if missing or extra:
            differ = [f"no field {', '.join(missing)}"] * bool(missing) + [f"field {', '.join(extra)}"] * bool(extra)
            raise DataError(f"{where}: {' and '.join(differ)} unlike the first row: every row must have the same "
                            f"fields, each a column")
        prompt = row[key]
        if not (isinstance(prompt, str) and key == prompt_key or _is_conversation(prompt)):
            raise DataError(f"{where}: \"{key}\" must be a {'string or a ' * (key == prompt_key)}list of messages "
                            f"({{\"role\": ..., \"content\": ...}}, both strings), got {repr(prompt)[:80]}")
        prompts.append(prompt)
        for name in columns:
            columns[name].append(row[name])
    return [where for where, _ in rows], prompts, columns


def _is_conversation(messages):
    return isinstance(messages, list) and len(messages) > 0 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)


def load_prompt_dataset(path, tokenizer, prompt_key="prompt", template=None, chat=False, max_tokens=None,
                        truncate="none", limit=None):
    """The PromptSet of a prompt file (read_rows' formats, split_rows' rows; `limit`: its first that
    many prompts only), encoded, rendered and fitted by make_prompt_set."""
    wheres, prompts, columns = split_rows(read_rows(path, prompt_key), path, prompt_key)
    return make_prompt_set(wheres[:limit], prompts[:limit], {k: v[:limit] for k, v in columns.items()}, tokenizer,
                           template, chat, max_tokens, truncate)


def make_prompt_set(wheres, prompts, columns, tokenizer, template=None, chat=False, max_tokens=None, truncate="none"):
    """A PromptSet of prompts (strings or conversations) found at `wheres` (file and line: the errors
    name them), encoded with `tokenizer` (a tokenizers.Tokenizer). A string is encoded as written,
    after the BOS the tokenizer puts first; with `chat` (--chat_template), it is the user's turn of
    `template`'s chat template (a checkpoint folder: the policy's), the assistant's turn opened. A
    conversation is always rendered with that template, its system and earlier turns kept. Each
    prompt then fits max_tokens (fit_prompts)."""
    rendered = [chat or not isinstance(p, str) for p in prompts]
    render = _chat_renderer(template, wheres[rendered.index(True)], chat) if any(rendered) else None
    texts = []
    for where, prompt, as_chat in zip(wheres, prompts, rendered):
        if as_chat:
            try:
                prompt = render([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt)
            except ValueError as e:
                raise DataError(f"{where}: {e}") from None
        texts.append(prompt)
    ids = encode_prompts(texts, tokenizer, None, wheres, rendered)
    return PromptSet(fit_prompts(ids, max_tokens, truncate, wheres.__getitem__, leading_special_ids(tokenizer)),
                     texts, columns)


def _chat_renderer(folder, where, chat):
    """chat.renderer(folder), the first prompt it renders at `where`: a user's turn (chat) or a conversation."""
    assert folder is not None or not chat, "chat=True needs the policy's folder (template)"
    if folder is not None:
        try:
            return renderer(folder)
        except hub.CheckpointError:
            if chat:
                raise  # --chat_template with a policy that has none: chat.load_template says so
    none = f"{folder} has none (tokenizer_config.json's chat_template or chat_template.jinja)" if folder else \
        "no policy folder was given"
    raise DataError(f"{where}: a list of messages is rendered with the policy's chat template, and {none}: give "
                    f"prompt strings, or use a chat model's checkpoint")


def load_prompt_file(path, tokenizer):
    """The prompts of a prompt file (load_prompt_dataset), as lists of token ids of `tokenizer`."""
    return load_prompt_dataset(path, tokenizer).ids


def encode_prompts(texts, tokenizer, source, wheres=None, rendered=None):
    """Prompt texts as lists of token ids of `tokenizer`, after the BOS it puts first, if any (no
    other special tokens); those `rendered` marks were written by a chat template, BOS included, so
    get nothing added. A DataError for one that encodes to no tokens, naming wheres[i] (its line)
    or else `source` (where they came from) and its number."""
    bos, rendered = leading_special_ids(tokenizer), rendered or [False] * len(texts)
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    for i, e in enumerate(encodings):
        if not e.ids:
            raise DataError(f"{wheres[i]}: the prompt encodes to no tokens" if wheres else
                            f"{source}: prompt {i + 1} encodes to no tokens")
    return [e.ids if as_chat else bos + e.ids for e, as_chat in zip(encodings, rendered)]
