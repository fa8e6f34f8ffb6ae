"""
The reward: a sentiment classifier's opinion of the decoded text (prompt + completion).

r(x, y) = P(positive | x + y) by default (or the raw positive logit), and a fixed penalty
(−1) for a completion that never emitted EOS within the token budget.

The classifier is a DistilBERT (the reward model of the paper), or a GPT-2 or Llama-layout sequence
classifier (a judge of another kind, or a reward model such as a Qwen2 or Gemma 2 one), whichever
the checkpoint's config.json names; the tokenizer is the one its folder holds. Scored without `finished`, the same class is a judge:
plain P(positive), no −1 rule. Any such classifier works, whatever its classes: `label` names
the one that is rewarded (by default the one named POSITIVE).
"""

import os

import torch

from nanowarp import hub
from nanowarp.distilbert import DistilBertClassifier
from nanowarp.hub import CheckpointError
from nanowarp.models import CLASSIFIERS as DECODER_CLASSIFIERS
from nanowarp.padding import right_pad
from nanowarp.tokenizer import load_tokenizer

POSITIVE_NAMES = ("positive", "pos", "label_1")


def positive_index(id2label):
    """Index of the positive class: the label named POSITIVE (or similar), else the last one."""
    for i, label in id2label.items():
        if str(label).lower() in POSITIVE_NAMES:
            return int(i)
    return len(id2label) - 1


# by config.json's model_type: DistilBERT, GPT-2 and the Llama layout (llama, qwen2, mistral, gemma, gemma2)
CLASSIFIERS = {"distilbert": DistilBertClassifier, **DECODER_CLASSIFIERS}


def load_classifier(name_or_path):
    """A DistilBertClassifier, GPT2Classifier or LlamaClassifier, by the model_type of the checkpoint's config.json."""
    folder = hub.resolve(name_or_path)
    model_type = hub.load_config(folder).get("model_type")
    if model_type not in CLASSIFIERS:
        raise CheckpointError(f"unknown model_type {model_type!r} in {os.path.join(folder, 'config.json')}: "
                              f"a sentiment classifier must be one of {', '.join(CLASSIFIERS)}")
    return CLASSIFIERS[model_type].from_pretrained(folder)


class RewardModel:
    def __init__(self, name_or_path, device="cpu", batch_size=64, kind="prob", no_eos_penalty=-1.0, label=None,
                 dtype=torch.float32):
        # dtype: of the weights and the forward pass (bf16 with --dtype bfloat16); rewards are float32
        self.model = load_classifier(name_or_path).eval().to(device, dtype)
        cfg = self.model.config
        if cfg.num_labels < 2:
            raise CheckpointError(f"the reward model {name_or_path} has {cfg.num_labels} label: a sentiment "
                                  f"reward needs a classifier with a negative and a positive label")
        assert kind in ("prob", "logit"), kind
        self.tokenizer = load_tokenizer(name_or_path)
        self.tokenizer.no_padding()  # padding is done here, to the right
        self.tokenizer.enable_truncation(cfg.max_position_embeddings)  # long texts: keep the beginning
        self.pad_id = cfg.pad_token_id or 0
        self.name = name_or_path
        self.positive = self.label_index(label)
        self.device, self.batch_size, self.kind, self.no_eos_penalty = device, batch_size, kind, no_eos_penalty

    def label_index(self, label=None):
        """Index of the rewarded label: the one named `label`, or by default positive_index's."""
        id2label = self.model.config.id2label
        if label is None:
            return positive_index(id2label)
        for i, name in id2label.items():
            if str(name) == label:
                return int(i)
        raise ValueError(f"the reward model {self.name} has no label {label!r}; its labels are "
                         f"{', '.join(repr(str(id2label[k])) for k in sorted(id2label, key=int))}")

    @torch.no_grad()
    def score(self, texts, finished=None):
        """Rewards (N,) float32 on the CPU; finished (N,) bool marks completions that emitted EOS."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer.encode_batch(texts[start:start + self.batch_size])
            # right padding: DistilBERT's head reads token 0, a decoder's the last real token
            ids, mask = right_pad([e.ids for e in enc], self.pad_id, self.device)
            logits = self.model(ids, mask).float()
            out.append(logits.softmax(-1)[:, self.positive] if self.kind == "prob" else logits[:, self.positive])
        rewards = torch.cat(out).cpu() if out else torch.zeros(0)
        if finished is not None:
            rewards = torch.where(finished.cpu(), rewards, torch.full_like(rewards, self.no_eos_penalty))
        return rewards
