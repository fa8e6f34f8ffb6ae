"""
DistilBERT sequence classifier (the WARP reward model), in plain PyTorch.

References:
1) DistilBERT: Sanh et al. 2019, "DistilBERT, a distilled version of BERT", arXiv 1910.01108.
2) Hugging Face transformers `models/distilbert/modeling_distilbert.py`
   (`DistilBertForSequenceClassification`): the checkpoints we load and write.

Modules are named like the checkpoint keys, without their `distilbert.` prefix, so loading is
a rename plus a shape check. A post-LN encoder; the head reads the first ([CLS]) token, so
inputs should be right-padded: like transformers, positions count from the first column, and
a left-padded row gives different logits than the same row unpadded.
"""

import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanowarp import hub
from nanowarp.hub import CheckpointError
from nanowarp.memory import new_head, run_block, set_weights
from nanowarp.models.layers import config_from_hf, load_pretrained

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}  # "gelu" is the exact (erf) GELU, as in transformers
HEAD = ("pre_classifier.", "classifier.")  # new when the checkpoint is a base model
MLM_HEAD = ("vocab_transform.", "vocab_layer_norm.", "vocab_projector.")  # base (masked-LM) checkpoints
LN_EPS = 1e-12  # hard-coded in transformers' DistilBERT


@dataclass
class DistilBertConfig:
    vocab_size: int = 30522
    max_position_embeddings: int = 512
    dim: int = 768  # hidden width
    n_layers: int = 6
    n_heads: int = 12
    hidden_dim: int = 3072  # FFN width
    activation: str = "gelu"
    sinusoidal_pos_embds: bool = False  # fixed sin/cos position table instead of a learned one
    dropout: float = 0.1
    attention_dropout: float = 0.1
    seq_classif_dropout: float = 0.2  # dropout before the classifier
    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    num_labels: int = 2
    id2label: dict | None = None  # {0: "NEGATIVE", 1: "POSITIVE"}; LABEL_i when None

    def __post_init__(self):
        if self.id2label is None:
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)}
        assert len(self.id2label) == self.num_labels, "id2label must name every label"
        assert self.dim % self.n_heads == 0, "n_heads must divide dim"

    @property
    def label2id(self):
        return {label: i for i, label in self.id2label.items()}

    @classmethod
    def from_hf(cls, d: dict, where="config.json"):
        """Build from the dict of a Hugging Face config.json (missing fields take HF's defaults)."""
        hub.check_config(cls, d, where, sizes=("vocab_size", "max_position_embeddings", "dim", "n_layers", "n_heads",
                                               "hidden_dim"))
        if d.get("activation", "gelu") not in ACTIVATIONS:
            raise CheckpointError(f"activation {d['activation']!r} in config.json is not supported "
                                  f"(supported: {', '.join(ACTIVATIONS)})")
        id2label = {int(i): label for i, label in d["id2label"].items()} if d.get("id2label") else None
        kwargs = {name: d[name] for name in cls.__dataclass_fields__ if name in d and name != "id2label"}
        kwargs["num_labels"] = len(id2label) if id2label else d.get("num_labels", 2)
        return cls(**kwargs, id2label=id2label)

    def n_weights(self):
        """A lower bound on the model's number of weights (its embeddings and matrices)."""
        d = self.dim
        return (self.vocab_size + self.max_position_embeddings) * d + self.n_layers * (4 * d * d + 2 * d * self.hidden_dim)

    def to_hf(self) -> dict:
        """The config.json that transformers' DistilBertForSequenceClassification reads."""
        d = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "num_labels"}
        d["id2label"] = {str(i): label for i, label in self.id2label.items()}
        d["label2id"] = self.label2id
        return {"model_type": "distilbert", "architectures": ["DistilBertForSequenceClassification"], **d}


class SelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_heads, self.p_drop = config.n_heads, config.attention_dropout
        self.q_lin = nn.Linear(config.dim, config.dim)
        self.k_lin = nn.Linear(config.dim, config.dim)
        self.v_lin = nn.Linear(config.dim, config.dim)
        self.out_lin = nn.Linear(config.dim, config.dim)

    def forward(self, x, mask):  # x: (B, T, C); mask: (B, 1, 1, T) bool, True = may attend, or None
        B, T, C = x.shape
        q, k, v = (lin(x).view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)
                   for lin in (self.q_lin, self.k_lin, self.v_lin))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.p_drop if self.training else 0.0)
        return self.out_lin(y.transpose(1, 2).reshape(B, T, C))


class FFN(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.lin1 = nn.Linear(config.dim, config.hidden_dim)
        self.lin2 = nn.Linear(config.hidden_dim, config.dim)
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x):
        return self.lin2(self.act(self.lin1(x)))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention = SelfAttention(config)
        self.sa_layer_norm = nn.LayerNorm(config.dim, eps=LN_EPS)
        self.ffn = FFN(config)
        self.output_layer_norm = nn.LayerNorm(config.dim, eps=LN_EPS)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask):
        x = self.sa_layer_norm(x + self.attention(x, mask))  # post-LN, as in BERT
        return self.output_layer_norm(x + self.dropout(self.ffn(x)))


class DistilBertClassifier(nn.Module):
    gradient_checkpointing = False  # recompute each block's activations in the backward pass (memory.run_block)

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.config = config
        self.embeddings = nn.ModuleDict(dict(
            word_embeddings=nn.Embedding(config.vocab_size, config.dim, padding_idx=config.pad_token_id),
            position_embeddings=nn.Embedding(config.max_position_embeddings, config.dim),
            LayerNorm=nn.LayerNorm(config.dim, eps=LN_EPS),
        ))
        self.transformer = nn.ModuleDict(dict(layer=nn.ModuleList(Block(config) for _ in range(config.n_layers))))
        self.pre_classifier = nn.Linear(config.dim, config.dim)
        self.classifier = nn.Linear(config.dim, config.num_labels)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.head_dropout = nn.Dropout(config.seq_classif_dropout)
        self.apply(self._init_weights)
        if config.sinusoidal_pos_embds:
            with torch.no_grad():
                self.embeddings.position_embeddings.weight.copy_(
                    sinusoidal_table(config.max_position_embeddings, config.dim))

    def _init_weights(self, module):  # as transformers does, so a fresh head matches theirs
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            nn.init.zeros_(module.weight[module.padding_idx])

    def forward(self, input_ids, attention_mask=None):
        """input_ids (B, T), attention_mask (B, T) with 1 for tokens and 0 for padding -> logits (B, num_labels)."""
        B, T = input_ids.shape
        if T > self.config.max_position_embeddings:
            raise ValueError(f"{T} tokens is more than the model's max_position_embeddings "
                             f"({self.config.max_position_embeddings}): truncate the inputs")
        emb = self.embeddings
        pos = torch.arange(T, device=input_ids.device)
        x = emb.LayerNorm(emb.word_embeddings(input_ids) + emb.position_embeddings(pos))  # (B, T, C)
        x = self.emb_dropout(x)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # masks keys only
        for block in self.transformer.layer:
            x = run_block(self, block, x, mask)
        h = F.relu(self.pre_classifier(x[:, 0]))  # the [CLS] token, (B, C)
        return self.classifier(self.head_dropout(h))

    # --- checkpoints in the Hugging Face layout ---

    def hf_state_dict(self):
        """Weights under the names DistilBertForSequenceClassification uses."""
        return {(k if k.startswith(HEAD) else "distilbert." + k): v for k, v in self.state_dict().items()}

    def save_pretrained(self, folder):
        hub.save_checkpoint(folder, self.config.to_hf(), self.hf_state_dict())

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=torch.float32):
        """Load a local folder or a Hub id, its weights in `dtype` (built on the meta device, without
        random values, then given the tensors read from the file). A base checkpoint (masked-LM, or
        the bare encoder) gets a freshly initialised classifier head, with a one-line note on stderr."""
        def read_config(d, where):
            if d.get("model_type") != "distilbert":
                raise CheckpointError(f"unknown model_type {d.get('model_type')!r} in {where}: expected 'distilbert'")
            config = config_from_hf(DistilBertConfig, d, where)
            return config, config.n_weights()
        return load_pretrained(cls, name_or_path, dtype, read_config)

    def load_hf_state_dict(self, state_dict, path="the state dict", assign=False):
        """Copy in weights named as in transformers, with or without the `distilbert.` prefix (assign:
        into a model built on the meta device, taking the tensors: memory.set_weights)."""
        found = {k.removeprefix("distilbert."): v for k, v in state_dict.items()}
        found.pop("embeddings.position_ids", None)  # a buffer older transformers saved, not a weight
        ignored = sorted(k for k in found if k.startswith(MLM_HEAD))
        found = {k: v for k, v in found.items() if k not in ignored}
        expected = self.state_dict()
        head = [k for k in expected if k.startswith(HEAD)]
        # only a checkpoint with no head at all is a base model; a partial head is a broken file
        new = head if not any(k in found for k in head) else []
        hub.check_keys({k: v.shape for k, v in expected.items()}, found, path, new_ok=new)
        set_weights(self, found, assign)
        for name in sorted({k.split(".")[0] for k in new}):  # pre_classifier, classifier
            new_head(getattr(self, name), self.embeddings.word_embeddings.weight, self.config.initializer_range)
        if new or ignored:  # one line, not a UserWarning with a quoted source line
            modules = lambda keys: ", ".join(sorted({k.rsplit(".", 1)[0] for k in keys}))  # noqa: E731
            print(f"note: {path}: " + (f"a base DistilBERT checkpoint: new, randomly initialised classifier head "
                                      f"({modules(new)}); fine-tune it before using its outputs" if new else "")
                  + ("; " if new and ignored else "") + (f"ignored its masked-LM head ({modules(ignored)})"
                                                         if ignored else ""), file=sys.stderr)
        return self


def sinusoidal_table(n_positions, dim):
    """Fixed position table of Vaswani et al. 2017: sin on even columns, cos on odd ones."""
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]
    angle = pos / 10000 ** (torch.arange(dim) // 2 * 2 / dim)  # (P, dim)
    table = torch.empty(n_positions, dim, dtype=torch.float64)
    table[:, 0::2], table[:, 1::2] = torch.sin(angle[:, 0::2]), torch.cos(angle[:, 1::2])
    return table.float()
