"""
The parts of the policy π_θ (and of the classifiers) that the model files share: the linear layer, the
static KV cache the sampler of y ~ π_θ(·|x) fills, the attention masks of left-padded batches, a classifier's
labels and its read at the last token, and loading a checkpoint without random values (meta device, then the file).
"""

import os
import warnings

import torch
import torch.nn as nn

from nanowarp import hub
from nanowarp.fast.matmul import linear
from nanowarp.memory import build_empty, new_head, set_weights


class Linear(nn.Linear):
    """nn.Linear, computed by fast.matmul.linear: (W·xᵀ)ᵀ for the few rows of a decoding step on a CPU."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


class KVCache(nn.Module):
    """Preallocated keys and values of one layer, (B, H, max_len, head_dim): no reallocation while
    decoding, so every decoding step has the same shapes."""

    def __init__(self, batch_size, max_len, n_head, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_head, max_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):
        # input_pos (T,) cache slots of the new keys and values k, v (B, H, T, head_dim)
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        return self.k_cache, self.v_cache


class Decoder(nn.Module):
    """What the decoder language models (GPT2, Llama) share beside their layers: the KV caches the sampler
    sets up, gradient checkpointing, and a bf16 model's float32 head while it samples. A model names its
    attention layers (`attentions`), its cache's heads (`cache_heads`) and its token embedding (`embedding`)."""
    gradient_checkpointing = False  # recompute each block's activations in the backward pass (memory.run_block)
    head_fp32 = None  # a float32 copy of a bf16 lm_head while nanowarp.sampling.sample runs

    def __init__(self, config):
        super().__init__()
        self.config = config

    def add_lm_head(self, width):
        """The LM head (vocab_size, width), after the body (the order of the modules is the order of their
        random initialisation), tied to the token embedding where the checkpoints tie it."""
        self.lm_head = nn.Linear(width, self.config.vocab_size, bias=False)
        self.tie_weights()

    def setup_caches(self, max_batch_size, max_seq_length):
        """Give every attention layer a preallocated KV cache of its key/value heads; hidden_states then
        takes `input_pos`."""
        assert max_seq_length <= self.config.n_positions, "sequence longer than the model's positions"
        (n_heads, head_dim), w = self.cache_heads(), self.embedding().weight
        for attention in self.attentions():
            attention.kv_cache = KVCache(max_batch_size, max_seq_length, n_heads, head_dim, w.dtype, w.device)

    def clear_caches(self):
        for attention in self.attentions():
            attention.kv_cache = None


def causal_mask(input_pos, S):
    """(T, S) bool: the query at cache slot input_pos[t] may attend to slots 0..input_pos[t]."""
    return input_pos[:, None] >= torch.arange(S, device=input_pos.device)


def positions_and_mask(attention_mask, input_pos, batch_size, cache_len=None):
    """Each token's position and the attention mask of a left-padded batch.

    attention_mask (B, S): 1 = token, 0 = padding, over cache slots 0..S-1 (S = T without a cache), or
    None: no padding. input_pos (T,): the cache slots of the tokens. Returns positions (B, T), which
    count real tokens only, so a padded row computes what it would alone, and the mask: (B, 1, T, S)
    bool, or without attention_mask the causal one (T, S) over cache_len slots, None without a cache
    (causal attention then needs no mask)."""
    if attention_mask is None:
        mask = None if cache_len is None else causal_mask(input_pos, cache_len)
        return input_pos.expand(batch_size, input_pos.numel()), mask
    attention_mask = attention_mask.bool()
    # padding slots get position 0 (never attended)
    pos = (attention_mask.cumsum(-1) - 1).clamp(min=0).index_select(1, input_pos)
    S = attention_mask.size(1)
    own_slot = input_pos[:, None] == torch.arange(S, device=input_pos.device)
    # padding queries see only themselves: finite garbage instead of a NaN from an empty softmax
    return pos, (causal_mask(input_pos, S) & (attention_mask[:, None, :] | own_slot))[:, None]


class Labels:
    """The labels of a decoder classifier's config (GPT-2 or Llama layout): `num_labels` and
    `id2label` ({0: "NEGATIVE", 1: "POSITIVE"}; LABEL_i when None), and label2id."""

    def set_labels(self):
        if self.id2label is None:
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)}
        self.id2label = {int(i): label for i, label in self.id2label.items()}  # config.json's keys are strings
        self.num_labels = len(self.id2label)

    @property
    def label2id(self):
        return {label: i for i, label in self.id2label.items()}


def at_last_token(h, attention_mask=None):
    """h (B, T, d) read at each row's last real token (attention_mask (B, T): 1 = token, 0 = padding)
    -> (B, d)."""
    B, T = h.shape[:2]
    last = torch.full((B,), T - 1, device=h.device) if attention_mask is None else \
        T - 1 - attention_mask.flip(1).argmax(1)  # the last column holding a real token
    return h[torch.arange(B, device=h.device), last]


def classify(model, input_ids, attention_mask, length_name):
    """A decoder classifier's logits (B, num_labels): its `score` head read at each row's last real
    token; inputs longer than the model's positions (config.n_positions, called length_name in its
    config.json) are refused."""
    T = input_ids.shape[1]
    if T > model.config.n_positions:
        raise ValueError(f"{T} tokens is more than the model's {length_name} ({model.config.n_positions}): "
                         f"truncate the inputs")
    return model.score(at_last_token(model.hidden_states(input_ids, attention_mask), attention_mask))


def load_score(model, score, where, embedding, assign=False, device=None, dtype=None):
    """A decoder classifier's head `score.weight` from its checkpoint; a language model's checkpoint
    (score None) gets a fresh, randomly initialised head, with a warning."""
    if score is None:
        warnings.warn(f"{where} has no classifier head: new, randomly initialised score.weight. "
                      f"Fine-tune the model before using its outputs.", stacklevel=4)
        new_head(model.score, embedding)
    else:
        hub.check_keys({"score.weight": model.score.weight.shape}, {"score.weight": score.shape}, where)
        set_weights(model, {"score.weight": score}, assign, device, dtype)


def config_from_hf(config_class, d, where):
    """config_class.from_hf(d): a CheckpointError for what its checks cannot see (id2label's keys, ...)."""
    try:
        return config_class.from_hf(d, where=where)
    except (TypeError, ValueError, AssertionError, AttributeError) as e:
        raise hub.CheckpointError(f"{where} holds values no model can be built from ({e})") from None


def load_pretrained(cls, name_or_path, dtype, read_config):
    """The model `cls` of a checkpoint (folder or Hub id), its weights in `dtype`: read_config(d, where)
    gives its config and number of weights from config.json (checked against the files before any
    memory is allocated); the model is built on the meta device, without random values, then given
    the tensors read from the file (hub.load_state_dict)."""
    folder = hub.resolve(name_or_path)
    where = os.path.join(folder, "config.json")
    config, n_weights = read_config(hub.load_config(folder), where)
    hub.check_size(folder, n_weights, where)
    model = build_empty(lambda: cls(config))
    state_dict, path = hub.load_state_dict(folder, dtype)
    return model.load_hf_state_dict(state_dict, path, assign=True)
