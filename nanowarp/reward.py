"""
The reward r(x, y) of a completion y of a prompt x: one or more sources, combined by weights.

    r(x, y) = Σ_s w_s · r_s(x, y),   or no_eos_penalty (−1) when y emitted no EOS in time

A source is anything that maps the decoded texts of a batch (and the prompt rows' other fields,
`columns`) to one float per row:

- `RewardModel` (--reward_model): a sequence classifier, DistilBERT (the paper's), GPT-2 or
  Llama layout (Qwen2, Gemma 2, ... reward models), whichever the checkpoint's config.json names,
  with the tokenizer its folder holds. Two or more labels: P(label) by softmax (or the raw logit),
  the label named by `label` or else the one named POSITIVE; a multi-label classifier
  (problem_type multi_label_classification): sigmoid(logit). One label (a scalar reward model,
  TRL's and OpenRLHF's kind): the logit itself. Without the −1 rule the same class is a judge.
- `RewardFunction` (--reward_fn FILE.py:NAME): a plain Python function, called as TRL calls its
  `reward_funcs`: NAME(prompts=[...], completions=[...], **columns) -> one float per completion.
- `RewardServer` (--reward_url URL): OpenRLHF's remote-reward protocol over HTTP (serve_reward.py
  serves any reward of this module that way).

`Reward` holds the sources and their weights, checks what each returns (a wrong count, a NaN or an
exception stops the job naming the source and the first bad row: RewardError), and applies the
no-EOS rule once. docs/rewards.md has the whole story.
"""

import importlib.util
import json
import math
import numbers
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import torch

from nanowarp import hub
from nanowarp.hub import CheckpointError
from nanowarp.models import CLASSIFIERS as DECODER_CLASSIFIERS
from nanowarp.models.distilbert import DistilBertClassifier
from nanowarp.padding import right_pad
from nanowarp.tokenizer import load_tokenizer

POSITIVE_NAMES = ("positive", "pos", "label_1")


class RewardError(ValueError):
    """A reward source that failed or returned something unusable: what, which source, which row."""


@dataclass
class Texts:
    """The decoded texts of a batch, one entry per row (special tokens, EOS and padding dropped)."""
    prompts: list  # each prompt decoded alone
    completions: list  # each completion decoded alone
    queries: list  # prompt and completion decoded together: what a reward model reads (OpenRLHF's "query")

    def __len__(self):
        return len(self.prompts)

    def __getitem__(self, rows):  # a slice of the batch
        return Texts(self.prompts[rows], self.completions[rows], self.queries[rows])


def decode_texts(tokenizer, prompts, tokens, lengths):
    """Texts of a batch: prompts (token id lists), tokens (B, N) of completions, lengths (B,) their
    lengths (EOS included; skip_special_tokens drops it)."""
    completions = [t[:n] for t, n in zip(tokens.tolist(), lengths.tolist())]
    return Texts(tokenizer.decode_batch(prompts, skip_special_tokens=True),
                 tokenizer.decode_batch(completions, skip_special_tokens=True),
                 tokenizer.decode_batch([p + c for p, c in zip(prompts, completions)], skip_special_tokens=True))


def batch_columns(columns, rows):
    """The columns ({name: list}) of these rows (indices, repeats allowed)."""
    return {name: [values[i] for i in rows] for name, values in columns.items()}


# ---- reward models ------------------------------------------------------------------------------

# by config.json's model_type: DistilBERT, GPT-2 and the Llama layout (llama, qwen2, mistral, gemma, gemma2)
CLASSIFIERS = {"distilbert": DistilBertClassifier, **DECODER_CLASSIFIERS}


def load_classifier(name_or_path):
    """A DistilBertClassifier, GPT2Classifier or LlamaClassifier, by the model_type of the checkpoint's config.json."""
    folder = hub.resolve(name_or_path)
    model_type = hub.load_config(folder).get("model_type")
    if model_type not in CLASSIFIERS:
        raise CheckpointError(f"unknown model_type {model_type!r} in {os.path.join(folder, 'config.json')}: "
                              f"a reward model must be one of {', '.join(CLASSIFIERS)}")
    return CLASSIFIERS[model_type].from_pretrained(folder)


def rewarded_label(id2label, label=None, name="the reward model"):
    """Index of the rewarded class: `label` (a name, or an index), else the one named POSITIVE (or
    pos, LABEL_1). A classifier with none of those names is refused: guessing (its last class, say)
    would train a {non-toxic, toxic} classifier's policy toward toxicity."""
    names = {int(i): str(v) for i, v in id2label.items()}
    listed = ", ".join(repr(names[i]) for i in sorted(names))
    if label is None:
        found = [i for i in sorted(names) if names[i].lower() in POSITIVE_NAMES]
        if found:
            return found[0]
        raise CheckpointError(f"{name} has no label named like 'positive' (its labels are {listed}): say which "
                              f"one is rewarded with --reward_label NAME (or its index)")
    for i in sorted(names):
        if names[i] == label:
            return i
    if label.isdigit() and int(label) in names:
        return int(label)
    raise ValueError(f"{name} has no label {label!r}; its labels are {listed}")


class RewardModel:
    """A classifier's reward for each text (see the module docstring); `input` says what it reads:
    prompt_completion (the query) or completion."""

    def __init__(self, name_or_path, device="cpu", batch_size=64, kind="prob", label=None,
                 input="prompt_completion", dtype=torch.float32):
        # dtype: of the weights and the forward pass (bf16 with --dtype bfloat16); rewards are float32
        self.model = load_classifier(name_or_path).eval().to(device, dtype)
        cfg = self.model.config
        assert input in ("prompt_completion", "completion"), input
        self.tokenizer = load_tokenizer(name_or_path)
        self.tokenizer.no_padding()  # padding is done here, to the right
        self.tokenizer.enable_truncation(cfg.max_position_embeddings)  # long texts: keep the beginning
        self.pad_id = cfg.pad_token_id or 0
        self.name = name_or_path
        problem_type = hub.load_config(hub.resolve(name_or_path)).get("problem_type")
        self.multi_label = problem_type == "multi_label_classification"
        self.device, self.batch_size, self.input = device, batch_size, input
        if kind is not None:  # None: set_scoring is called before scoring (eval.py: each model's job's settings)
            self.set_scoring(kind, label)

    def set_scoring(self, kind="prob", label=None):
        """Reward `label`'s probability (kind prob) or logit (kind logit); see the module docstring."""
        cfg = self.model.config
        if cfg.num_labels == 1:  # a scalar reward model: logits[:, 0]
            self.positive, self.kind = 0, "logit"
        else:
            self.positive = rewarded_label(cfg.id2label, label, f"the reward model {self.name}")
            assert kind in ("prob", "logit"), kind
            self.kind = "sigmoid" if self.multi_label and kind == "prob" else kind

    @torch.no_grad()
    def score(self, texts):
        """Rewards (N,) float32 on the CPU of a list of texts."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer.encode_batch(texts[start:start + self.batch_size])
            # right padding: DistilBERT's head reads token 0, a decoder's the last real token
            ids, mask = right_pad([e.ids for e in enc], self.pad_id, self.device)
            logits = self.model(ids, mask).float()
            if self.kind == "prob":
                logits = logits.softmax(-1)
            elif self.kind == "sigmoid":  # multi-label: each class on its own
                logits = logits.sigmoid()
            out.append(logits[:, self.positive])
        return torch.cat(out).cpu() if out else torch.zeros(0)

    def __call__(self, texts, columns):
        return self.score(texts.queries if self.input == "prompt_completion" else texts.completions)


# ---- reward functions ---------------------------------------------------------------------------

class RewardFunction:
    """A plain Python function NAME in FILE.py, loaded by path (in every process that uses it) and
    called as NAME(prompts=[...], completions=[...], **columns) -> one float per completion."""

    def __init__(self, spec):
        path, sep, name = spec.rpartition(":")
        if not sep or not path.endswith(".py") or not name:
            raise ValueError(f"--reward_fn {spec!r}: expected FILE.py:NAME, e.g. examples/rewards/keyword.py:keyword")
        if not os.path.isfile(path):
            raise ValueError(f"--reward_fn {spec}: no file {path}")
        module_name = "nanowarp_reward_" + os.path.splitext(os.path.basename(path))[0]
        loader = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader)
        try:
            loader.loader.exec_module(module)
        except Exception as e:
            raise ValueError(f"--reward_fn {spec}: importing {path} raised {type(e).__name__}: {e}") from e
        self.fn = getattr(module, name, None)
        if not callable(self.fn):
            raise ValueError(f"--reward_fn {spec}: {path} defines no function {name!r}")
        self.name, self.spec = name, spec

    def __call__(self, texts, columns):
        try:
            return self.fn(prompts=list(texts.prompts), completions=list(texts.completions), **columns)
        except Exception as e:
            raise RewardError(f"the reward function {self.spec} raised {type(e).__name__}: {e}, on a batch of "
                              f"{len(texts)} completions whose first is {row(texts, columns, 0)}") from e


# ---- remote rewards -----------------------------------------------------------------------------

def request_body(texts, columns, label_key=None):
    """The JSON body of a reward request: OpenRLHF's query, prompts and labels (the --label_key
    column, empty strings without one), and two keys it ignores, completions and columns, so that
    a nanowarp server calls a reward function with the arguments it gets in process."""
    labels = [str(v) for v in columns[label_key]] if label_key else [""] * len(texts)
    return {"query": list(texts.queries), "prompts": list(texts.prompts), "labels": labels,
            "completions": list(texts.completions), "columns": columns}


class RewardServer:
    """A reward served over HTTP (OpenRLHF's protocol): POST the request_body, get {"rewards": [...]}.
    A failed request (refused, timed out, an error status, an answer that is not such JSON) is tried
    again after BACKOFF, 2·BACKOFF, ... seconds, RETRIES times, then raises RewardError."""
    TIMEOUT, RETRIES, BACKOFF = 120.0, 3, 1.0

    def __init__(self, url, label_key=None, api_key=None):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--reward_url {url!r}: expected an http:// or https:// address, "
                             f"e.g. http://127.0.0.1:5000/get_reward")
        self.name = self.url = url
        self.label_key = label_key
        self.api_key = api_key if api_key is not None else os.environ.get("NANOWARP_REWARD_API_KEY")

    def __call__(self, texts, columns):
        body = json.dumps(request_body(texts, columns, self.label_key)).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.RETRIES + 1):
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.TIMEOUT) as answer:
                    rewards = json.loads(answer.read())["rewards"]
                return rewards
            except urllib.error.HTTPError as e:
                error = f"HTTP {e.code}: {e.read().decode(errors='replace')[:300]}"
                if e.code in (401, 403):  # a wrong token does not get better
                    break
            except (OSError, ValueError, KeyError, TypeError) as e:  # refused, timed out, not JSON, no "rewards"
                error = f"{type(e).__name__}: {e}"
            if attempt < self.RETRIES:
                time.sleep(self.BACKOFF * 2 ** attempt)
        raise RewardError(f"the reward server {self.url} failed {attempt + 1} times, last with {error}")


# ---- the reward ---------------------------------------------------------------------------------

def load_reward(cfg, device="cpu", dtype=torch.float32, batch_size=64):
    """The Reward a config names (train.py's flags; eval.py and sample.py name the same ones)."""
    sources = []
    if cfg.reward_model:
        sources.append(RewardModel(cfg.reward_model, device, batch_size, kind=cfg.reward_kind,
                                   label=cfg.reward_label, input=cfg.reward_input, dtype=dtype))
    sources += [RewardFunction(spec) for spec in cfg.reward_fn or ()]
    sources += [RewardServer(url, cfg.label_key, cfg.reward_api_key) for url in cfg.reward_url or ()]
    return Reward(sources, cfg.reward_weights, eos_penalty(cfg.no_eos_penalty))


def eos_penalty(value):
    """--no_eos_penalty as a number, or None for `none` (the rule off)."""
    return None if value is None or str(value).lower() == "none" else float(value)


class Reward:
    """r = Σ_s w_s · r_s over the sources, with the no-EOS rule applied once (None: off)."""

    def __init__(self, sources, weights=None, no_eos_penalty=-1.0):
        if not sources:
            raise ValueError("no reward: name --reward_model, --reward_fn or --reward_url")
        weights = [1.0] * len(sources) if not weights else [float(w) for w in weights]
        if len(weights) != len(sources):
            raise ValueError(f"--reward_weights has {len(weights)} value{'s' * (len(weights) != 1)} for "
                             f"{len(sources)} reward source{'s' * (len(sources) != 1)} (in the order "
                             f"reward_model, reward_fn..., reward_url...: {', '.join(s.name for s in sources)})")
        self.sources, self.weights, self.no_eos_penalty = sources, weights, no_eos_penalty
        self.names = unique_names(sources)

    def score(self, texts, finished=None, columns=None):
        """(rewards (N,) float32 on the CPU, {source name: its rewards (N,)}) of the texts; finished (N,)
        bool marks the completions that emitted EOS, the others get no_eos_penalty."""
        columns = columns or {}
        parts = {name: checked(source, source(texts, columns), texts, columns)
                 for name, source in zip(self.names, self.sources)}
        rewards = torch.zeros(len(texts))
        for w, part in zip(self.weights, parts.values()):
            rewards = rewards + w * part
        if finished is not None and self.no_eos_penalty is not None:
            rewards = torch.where(finished.cpu(), rewards, torch.full_like(rewards, self.no_eos_penalty))
        return rewards, parts


def unique_names(sources):
    """Each source's metric name (reward/NAME): model, the function's name, url; a repeat gets _2, _3, ..."""
    names = []
    for s in sources:
        base = "model" if isinstance(s, RewardModel) else "url" if isinstance(s, RewardServer) else s.name
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}_{n}"
        names.append(name)
    return names


def describe(source):
    if isinstance(source, RewardFunction):
        return f"the reward function {source.spec}"
    if isinstance(source, RewardServer):
        return f"the reward server {source.url}"
    return f"the reward model {source.name}"


def row(texts, columns, i):
    """Row i of a batch, for an error message: its prompt, completion and columns, cut short."""
    if i >= len(texts):
        return "none"
    fields = "".join(f", {k} {str(v[i])[:60]!r}" for k, v in columns.items())
    return f"row {i} (prompt {texts.prompts[i][:80]!r}, completion {texts.completions[i][:80]!r}{fields})"


def checked(source, values, texts, columns):
    """values as a float32 tensor (N,), or RewardError naming the source and the first bad row. A reward
    model's own tensor passes as it is: a NaN there is numerical, which rl_run's check_finite reports."""
    if isinstance(source, RewardModel):
        return values
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    try:
        values = list(values)
    except TypeError:
        raise RewardError(f"{describe(source)} returned {type(values).__name__}, not one float per completion")
    if len(values) != len(texts):
        raise RewardError(f"{describe(source)} returned {len(values)} rewards for {len(texts)} completions "
                          f"(the first: {row(texts, columns, 0)})")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise RewardError(f"{describe(source)} returned {v!r} at {row(texts, columns, i)}: a reward must be "
                              f"a finite number")
    return torch.tensor(values, dtype=torch.float32)
