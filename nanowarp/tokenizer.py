"""
Tokenizers for the checkpoints nanowarp uses, built on the `tokenizers` library from whatever
files a checkpoint ships, in this order:

1) `tokenizer.json`: a complete, serialised `tokenizers.Tokenizer` (`lvwerra/distilbert-imdb`);
2) `vocab.json` + `merges.txt`: GPT-2's byte-level BPE (`lvwerra/gpt2-imdb` ships only these);
3) `vocab.txt`: BERT's WordPiece, lowercased when `tokenizer_config.json` says `do_lower_case`,
   with `[CLS] ... [SEP]` around each sequence.

For 2) and 3) the pipeline is assembled here to match Hugging Face's GPT2TokenizerFast and
BertTokenizerFast, and the special tokens the checkpoint names (`<|endoftext|>`, `[CLS]`, ...)
are registered so that their text maps to their single id.
"""

import json
import os

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from nanowarp import hub

EOS = "<|endoftext|>"  # GPT-2's end of text, also its BOS, UNK and padding token
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # BERT's special tokens, [PAD] = 0
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _read_json(folder, filename):
    path = os.path.join(folder, filename)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise hub.CheckpointError(f"cannot read {path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise hub.CheckpointError(f"cannot read {path}: not a JSON object")
    return d


def _special_tokens(folder, defaults):
    """Special-token strings named by tokenizer_config.json / special_tokens_map.json."""
    found = list(defaults)
    for d in (_read_json(folder, "tokenizer_config.json"), _read_json(folder, "special_tokens_map.json")):
        for key in SPECIAL_KEYS:
            value = d.get(key)
            found.append(value.get("content") if isinstance(value, dict) else value)
        found += [t["content"] for t in d.get("added_tokens_decoder", {}).values() if t.get("special")]
    return list(dict.fromkeys(t for t in found if t))  # unique, in order


def _register(tok, tokens, vocab):
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens if t in vocab])
    return tok


def byte_level_bpe(model=None):
    """GPT-2's byte-level BPE pipeline around a `models.BPE` (an empty one, to train)."""
    tok = Tokenizer(model or models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def wordpiece(vocab=None, unk="[UNK]", lowercase=True, strip_accents=None, chinese_chars=True, cls="[CLS]",
              sep="[SEP]"):
    """BERT's WordPiece pipeline, as BertTokenizerFast builds it: over `vocab` ({token: id}), with
    `cls` ... `sep` around each sequence when the vocabulary has them; without a vocabulary, an
    empty one to train."""
    vocab = vocab or {}
    tok = Tokenizer(models.WordPiece(vocab, unk_token=unk, max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=chinese_chars,
                                                strip_accents=strip_accents, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    if cls in vocab and sep in vocab:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
            special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
    return tok


def read_bpe(folder):
    """GPT-2's byte-level BPE from vocab.json + merges.txt, its special tokens registered."""
    tok = byte_level_bpe(models.BPE.from_file(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")))
    return _register(tok, _special_tokens(folder, [EOS]), tok.get_vocab())


def read_wordpiece(folder):
    """BERT's WordPiece from vocab.txt (+ tokenizer_config.json), as BertTokenizerFast builds it."""
    config = _read_json(folder, "tokenizer_config.json")
    with open(os.path.join(folder, "vocab.txt"), encoding="utf-8") as f:
        vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
    unk = config.get("unk_token", "[UNK]")
    tok = wordpiece(vocab, unk if unk in vocab else "[UNK]", config.get("do_lower_case", True),
                    config.get("strip_accents"), config.get("tokenize_chinese_chars", True),
                    config.get("cls_token", "[CLS]"), config.get("sep_token", "[SEP]"))
    return _register(tok, _special_tokens(folder, BERT_SPECIALS), vocab)


def leading_special_ids(tokenizer):
    """The ids a tokenizer's own post-processor puts before every text: the BOS a model expects
    (Llama 3's `<|begin_of_text|>`, Gemma's `<bos>`), or [] (GPT-2's). Prompts start
    with them, as transformers' `tokenizer(text)` starts its encodings."""
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a", add_special_tokens=True).ids
    starts = [i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain]
    return full[:starts[0]] if plain and starts else []


def load_tokenizer(name_or_path):
    """A `tokenizers.Tokenizer` for a checkpoint folder or Hub id (see the module docstring)."""
    folder = hub.resolve(name_or_path, weights=False)
    has = lambda *names: all(os.path.isfile(os.path.join(folder, n)) for n in names)
    for files, read in ((["tokenizer.json"], lambda: Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))),
                        (["vocab.json", "merges.txt"], lambda: read_bpe(folder)),
                        (["vocab.txt"], lambda: read_wordpiece(folder))):
        if not has(*files):
            continue
        try:
            return read()
        except hub.CheckpointError:
            raise
        except Exception as e:  # the tokenizers library raises plain Exceptions on malformed files
            paths = " and ".join(os.path.join(folder, n) for n in files)
            raise hub.CheckpointError(f"cannot read the tokenizer files {paths}: {e}") from None
    raise hub.CheckpointError(f"{folder} has no tokenizer: expected tokenizer.json, or vocab.json + merges.txt, "
                              f"or vocab.txt")
