"""
GPT-2 in one file, loading real Hugging Face checkpoints (`lvwerra/gpt2-imdb`, `gpt2`): the policy π_θ of
Algorithm 1, π_θ(y_k | x, y_<k) = softmax(h_k · Wᵀ) with h_k its last hidden state and W the LM head (tied
to the token embeddings). What it shares with the Llama layout is in layers.py.

References:
1) OpenAI's GPT-2 release: https://github.com/openai/gpt-2/blob/master/src/model.py
2) Hugging Face transformers' modeling_gpt2.py, whose checkpoints this loads and writes
3) nanoGPT's model.py (the shape of this file) and gpt-fast's static KV cache

Modules are named like the checkpoint's keys (`transformer.h[i].attn.c_attn`), so loading is a
key-for-key copy. Two quirks of the checkpoints: GPT-2's projections are `Conv1D` layers whose
weight is [in, out], the transpose of `nn.Linear`; and `lm_head` is tied to `wte`.

Batches are left-padded: `attention_mask` (B, T) has 1 for tokens and 0 for padding, and each
row's positions count from its first real token, so a padded row computes exactly what it would
alone.

`GPT2Classifier` is transformers' GPT2ForSequenceClassification: the same body and a `score` head
(num_labels, n_embd), no bias, read at each row's last real token (a judge of another kind than
the DistilBERT reward model).
"""

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanowarp import hub
from nanowarp.memory import run_block, set_weights
from nanowarp.models.layers import (Decoder, Labels, Linear, classify, config_from_hf, load_pretrained, load_score,
                                    positions_and_mask)

# Conv1D weights, stored [in, out] in the checkpoints and [out, in] here
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# causal-mask buffers some checkpoints carry: not parameters, rebuilt on the fly
SKIPPED = (".attn.bias", ".attn.masked_bias")


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024  # maximum sequence length
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    bos_token_id: int = 50256
    eos_token_id: int = 50256

    @classmethod
    def from_hf(cls, d, where="config.json"):
        if d.get("model_type") != "gpt2":
            raise hub.CheckpointError(f"unknown model_type {d.get('model_type')!r} in {where}: "
                                      f"this is not a GPT-2 checkpoint (expected model_type 'gpt2')")
        hub.check_config(cls, d, where, sizes=("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner"))
        if (d.get("n_embd") or cls.n_embd) % (d.get("n_head") or cls.n_head):
            raise hub.CheckpointError(f"n_head={d.get('n_head')} in {where} does not divide n_embd={d.get('n_embd')}")
        if d.get("activation_function", "gelu_new") not in ACTIVATIONS:
            raise hub.CheckpointError(f"unsupported activation_function {d['activation_function']!r} "
                                      f"in {where}; supported: {', '.join(ACTIVATIONS)}")
        for flag, default in (("scale_attn_by_inverse_layer_idx", False), ("reorder_and_upcast_attn", False),
                              ("scale_attn_weights", True)):
            if d.get(flag, default) != default:
                raise hub.CheckpointError(f"{flag}={d[flag]} in {where} is not supported")
        return cls(**{f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None})

    def n_weights(self):
        """A lower bound on the model's number of weights (its embeddings and matrices)."""
        d = self.n_embd
        return (self.vocab_size + self.n_positions) * d + self.n_layer * (4 * d * d + 2 * d * (self.n_inner or 4 * d))

    def to_hf(self):
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_ctx": self.n_positions,
                "tie_word_embeddings": True, **asdict(self)}


ACTIVATIONS = {"gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
               "gelu": F.gelu, "relu": F.relu}


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.kv_cache = None

    def forward(self, x, mask, input_pos):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).contiguous().split(C, dim=2)  # (a no-op unless `linear` transposed)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
            S = mask.size(-1)  # attend over the slots the mask covers: a prefix of the cache
            k, v = k[:, :, :S], v[:, :, :S]
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        inner = config.n_inner or 4 * config.n_embd
        self.c_fc = Linear(config.n_embd, inner)
        self.c_proj = Linear(inner, config.n_embd)
        self.act = ACTIVATIONS[config.activation_function]

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, mask, input_pos):
        x = x + self.attn(self.ln_1(x), mask, input_pos)
        return x + self.mlp(self.ln_2(x))


class GPT2(Decoder):
    """GPT-2's language model, `transformer.*` as the checkpoints name it: token and learned position
    embeddings, n_layer pre-norm blocks, a final LayerNorm; the LM head is the token embedding (tied)."""
    config_class = GPT2Config  # what from_pretrained reads config.json into

    def __init__(self, config):
        super().__init__(config)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.n_positions, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.add_lm_head(config.n_embd)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # ---- forward -------------------------------------------------------------------------------

    def hidden_states(self, idx, attention_mask=None, input_pos=None):
        """Final hidden states (B, T, n_embd), after ln_f and before the LM head.

        idx (B, T) token ids. attention_mask (B, S): 1 = token, 0 = padding; without a KV cache
        S = T; with one, the mask covers cache slots 0..S-1 (S up to the cache length, past every
        slot written so far): attention reads those S slots only, so a decoding loop can pass a
        growing prefix of its mask and skip the empty end of the cache.
        input_pos (T,) are the cache slots of idx (default 0..T-1).
        """
        B, T = idx.shape
        cache = self.transformer.h[0].attn.kv_cache  # the sampler's (Decoder.setup_caches), or None
        if input_pos is None:
            input_pos = torch.arange(T, device=idx.device)
        pos, mask = positions_and_mask(attention_mask, input_pos, B, None if cache is None else cache.k_cache.size(2))
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = run_block(self, block, x, mask, input_pos)
        return self.transformer.ln_f(x)

    def forward(self, idx, attention_mask=None, input_pos=None):
        """Logits (B, T, vocab_size)."""
        return self.lm_head(self.hidden_states(idx, attention_mask, input_pos))

    def attentions(self):
        return [block.attn for block in self.transformer.h]

    def cache_heads(self):
        return self.config.n_head, self.config.n_embd // self.config.n_head

    def embedding(self):
        return self.transformer.wte

    # ---- Hugging Face checkpoints --------------------------------------------------------------

    def hf_state_dict(self, state_dict=None):
        """Weights in the Hugging Face layout (what GPT2LMHeadModel saves): `transformer.` prefix,
        Conv1D weights transposed to [in, out], no separate lm_head (it is tied to wte)."""
        return to_hf_state_dict(self.state_dict() if state_dict is None else state_dict)

    def load_hf_state_dict(self, state_dict, where="state dict", assign=False, device=None, dtype=None):
        """Load Hugging Face-layout weights, with or without the `transformer.` prefix. assign: into
        a model built on the meta device, taking the tensors (memory.set_weights)."""
        sd = {}
        for k, v in state_dict.items():
            k = k.removeprefix("transformer.")
            if k.endswith(SKIPPED) or k == "lm_head.weight":  # buffers; lm_head is tied to wte
                continue
            sd[k] = v
        expected = {k.removeprefix("transformer."): v.shape for k, v in self.hf_state_dict().items()
                    if k.startswith("transformer.")}  # a head other than the tied lm_head loads apart
        hub.check_keys(expected, sd, where)
        sd = {"transformer." + k: v.t() if k.endswith(CONV1D) else v for k, v in sd.items()}
        set_weights(self, sd, assign, device, dtype)  # lm_head.weight comes with wte
        self.tie_weights()  # again: assign gives wte a new tensor
        return self

    def tie_weights(self):
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in every GPT-2 checkpoint

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=torch.float32):
        """The model of a checkpoint (folder or Hub id), its weights in `dtype` (layers.load_pretrained)."""
        def read_config(d, where):
            config = config_from_hf(cls.config_class, d, where)
            return config, config.n_weights()
        return load_pretrained(cls, name_or_path, dtype, read_config)

    def save_pretrained(self, folder, state_dict=None):
        hub.save_checkpoint(folder, self.config.to_hf(), self.hf_state_dict(state_dict))


@dataclass
class GPT2ClassifierConfig(Labels, GPT2Config):
    num_labels: int = 2
    id2label: dict | None = None  # {0: "NEGATIVE", 1: "POSITIVE"}; LABEL_i when None
    pad_token_id: int | None = None  # transformers finds each row's last token as the last non-pad id

    def __post_init__(self):
        self.set_labels()

    @property
    def max_position_embeddings(self):  # DistilBertConfig's name: RewardModel truncates to it
        return self.n_positions

    def to_hf(self):
        d = {k: v for k, v in super().to_hf().items() if k != "num_labels"}  # transformers counts id2label
        return {**d, "architectures": ["GPT2ForSequenceClassification"],
                "id2label": {str(i): label for i, label in self.id2label.items()}, "label2id": self.label2id}


class GPT2Classifier(GPT2):
    """A sequence classifier in the layout of transformers' GPT2ForSequenceClassification:
    `transformer.*` plus `score.weight` (num_labels, n_embd). Batches are right-padded (or
    left-padded: positions count from each row's first real token either way)."""
    config_class = GPT2ClassifierConfig

    def __init__(self, config):
        super().__init__(config)  # keeps the tied lm_head: no parameter of its own, never saved
        self.score = nn.Linear(config.n_embd, config.num_labels, bias=False)
        nn.init.normal_(self.score.weight, mean=0.0, std=0.02)

    def forward(self, input_ids, attention_mask=None):
        """input_ids (B, T), attention_mask (B, T) 1 = token, 0 = padding -> logits (B, num_labels),
        read at each row's last real token."""
        return classify(self, input_ids, attention_mask, "n_positions")

    def load_hf_state_dict(self, state_dict, where="state dict", assign=False, device=None, dtype=None):
        """The body as GPT2 loads it, then `score.weight`; a GPT-2 language model (no head) gets a
        fresh, randomly initialised head, with a warning."""
        state_dict = dict(state_dict)
        score = state_dict.pop("score.weight", None)
        super().load_hf_state_dict(state_dict, where, assign, device, dtype)
        load_score(self, score, where, self.transformer.wte.weight, assign, device, dtype)
        return self


def to_hf_state_dict(state_dict):
    """nanowarp layout -> Hugging Face layout (see GPT2.hf_state_dict)."""
    return {k: v.t().contiguous() if k.endswith(CONV1D) else v
            for k, v in state_dict.items() if k != "lm_head.weight"}

