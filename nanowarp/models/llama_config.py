"""
The config of a Llama-layout decoder (nanowarp/models/llama.py), read from the config.json of five
families, as transformers 4.x and 5.x write them:

    model_type  what differs from Llama
    llama       (SmolLM2 too) optional Llama 3 rope scaling, attention and MLP biases
    qwen2       biases on q, k, v (not o); a sliding window only with use_sliding_window
    mistral     a sliding window on every layer (sliding_window: null in later releases)
    gemma       GeGLU (gelu tanh), RMSNorm scaled by (1 + w), embeddings times sqrt(d), head_dim 256
    gemma2      Gemma, plus a norm after attention and around the MLP, soft-capped attention
                and final logits, sliding-window layers alternating with full ones (layer 0
                sliding), queries scaled by query_pre_attn_scalar^-1/2

Rotary embeddings come as `rope_theta` + `rope_scaling` (transformers 4.x) or `rope_parameters`
(5.x); `inv_freq` computes the frequencies of rope types default, linear and llama3.
"""

import math
from dataclasses import dataclass, field, fields

import torch

from nanowarp import hub
from nanowarp.models.layers import Labels

FAMILIES = ("llama", "qwen2", "mistral", "gemma", "gemma2")
ARCHITECTURES = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral", "gemma": "Gemma", "gemma2": "Gemma2"}
ROPE_TYPES = ("default", "linear", "llama3")
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
SIZES = REQUIRED + ("num_key_value_heads", "head_dim", "max_position_embeddings")
LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclass
class LlamaConfig:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # grouped-query attention; None: one per query head
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"  # SwiGLU (silu) or GeGLU (gelu_pytorch_tanh)
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" or "linear", "factor": ..., ...}
    qkv_bias: bool = False  # Qwen2; Llama's attention_bias sets it and o_bias
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # attention reaches this many tokens back (itself included)
    layer_types: list | None = None  # per layer "sliding_attention" or "full_attention"; None: all full
    # Gemma
    norm_offset: bool = False  # RMSNorm multiplies by (1 + w)
    embed_scale: bool = False  # embeddings times sqrt(hidden_size)
    # Gemma 2
    sandwich_norms: bool = False  # post_attention_layernorm on the attention's output, pre/post_feedforward
    query_pre_attn_scalar: float | None = None  # attention scale query_pre_attn_scalar^-1/2 (None: head_dim)
    attn_logit_softcapping: float | None = None  # scores -> c·tanh(scores / c)
    final_logit_softcapping: float | None = None  # logits -> c·tanh(logits / c)
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    hf: dict | None = field(default=None, compare=False, repr=False)  # config.json as read, written back

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        assert self.num_attention_heads % self.num_key_value_heads == 0, "query heads must group over key heads"

    @property
    def n_positions(self):  # GPT2Config's name: the sampler and the evaluation read it
        return self.max_position_embeddings

    def is_sliding(self, layer):
        return self.sliding_window is not None and (self.layer_types is None or
                                                    self.layer_types[layer] == "sliding_attention")

    @classmethod
    def from_hf(cls, d, where="config.json"):
        model_type = d.get("model_type")
        if model_type not in FAMILIES:
            raise hub.CheckpointError(f"unknown model_type {model_type!r} in {where}: a Llama-layout decoder is "
                                      f"one of {', '.join(FAMILIES)}")
        check(d, where)
        gemma = model_type in ("gemma", "gemma2")
        act = d.get("hidden_activation") or d.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
        if gemma and act == "gelu":  # early Gemma configs; transformers runs them with the tanh form
            act = "gelu_pytorch_tanh"
        if act not in ("silu", "gelu_pytorch_tanh"):
            raise hub.CheckpointError(f"unsupported hidden_act {act!r} in {where}; supported: silu, gelu_pytorch_tanh")
        theta, scaling = rope_from_hf(d, where)
        sliding = d.get("sliding_window")
        layer_types = d.get("layer_types")
        if model_type == "qwen2" and not d.get("use_sliding_window", False):
            sliding, layer_types = None, None
        if model_type == "qwen2" and sliding is not None and layer_types is None:
            layer_types = ["sliding_attention" if i >= d.get("max_window_layers", 28) else "full_attention"
                           for i in range(d["num_hidden_layers"])]
        if model_type in ("llama", "gemma"):
            sliding, layer_types = None, None
        if model_type == "gemma2" and layer_types is None:
            layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention"
                           for i in range(d["num_hidden_layers"])]
        bias = d.get("attention_bias", False)
        return cls(
            model_type=model_type, **{k: d[k] for k in REQUIRED},
            num_key_value_heads=d.get("num_key_value_heads"), head_dim=d.get("head_dim"),
            max_position_embeddings=d.get("max_position_embeddings", 2048), rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            hidden_act=act, rope_theta=theta, rope_scaling=scaling, qkv_bias=model_type == "qwen2" or bias,
            o_bias=bias and model_type != "qwen2", mlp_bias=d.get("mlp_bias", False),
            tie_word_embeddings=d.get("tie_word_embeddings", gemma), sliding_window=sliding, layer_types=layer_types,
            norm_offset=gemma, embed_scale=gemma, sandwich_norms=model_type == "gemma2",
            query_pre_attn_scalar=d.get("query_pre_attn_scalar") if model_type == "gemma2" else None,
            attn_logit_softcapping=d.get("attn_logit_softcapping") if model_type == "gemma2" else None,
            final_logit_softcapping=d.get("final_logit_softcapping") if model_type == "gemma2" else None,
            bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"), pad_token_id=d.get("pad_token_id"),
            hf=dict(d))

    def to_hf(self):
        """config.json: the one read (if any) with these fields over it, in transformers' names."""
        family = ARCHITECTURES[self.model_type]
        d = {k: v for k, v in (self.hf or {}).items() if k not in ("torch_dtype", "dtype", "rope_parameters",
                                                                     "rope_scaling", "rope_theta")}
        d.update({k: getattr(self, k) for k in (
            "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
            "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")})
        d["architectures"] = [f"{family}ForCausalLM"]
        d["hidden_activation" if self.model_type == "gemma2" else "hidden_act"] = self.hidden_act
        d["rope_theta"] = self.rope_theta  # the 4.x form, which 5.x reads too
        if self.rope_scaling is not None:
            d["rope_scaling"] = self.rope_scaling
        if self.model_type == "llama":
            d.update(attention_bias=self.o_bias, mlp_bias=self.mlp_bias)
        if self.model_type in ("qwen2", "mistral", "gemma2"):
            d["sliding_window"] = self.sliding_window
        if self.model_type == "qwen2":
            d["use_sliding_window"] = self.sliding_window is not None
        if self.layer_types is not None:
            d["layer_types"] = self.layer_types
        if self.model_type == "gemma2":
            d.update(query_pre_attn_scalar=self.query_pre_attn_scalar,
                     attn_logit_softcapping=self.attn_logit_softcapping,
                     final_logit_softcapping=self.final_logit_softcapping)
        return d


def check(d, where):
    """Raise CheckpointError naming `where` unless config.json's sizes and their relations are those
    of a model: a damaged file must not build a model of another size, loop or divide by zero."""
    missing = [k for k in REQUIRED if k not in d]
    if missing:
        raise hub.CheckpointError(f"{where} has no {missing[0]}: a Llama-layout config.json needs {', '.join(REQUIRED)}")
    hub.check_config(LlamaConfig, d, where, sizes=SIZES)
    heads = d["num_attention_heads"]
    kv = d.get("num_key_value_heads") or heads
    if heads % kv:
        raise hub.CheckpointError(f"num_attention_heads={heads} in {where} is not a multiple of num_key_value_heads={kv}")
    if not d.get("head_dim") and d["hidden_size"] < heads:
        raise hub.CheckpointError(f"hidden_size={d['hidden_size']} in {where} is smaller than num_attention_heads={heads}")
    types = d.get("layer_types")
    if types is not None and (len(types) != d["num_hidden_layers"] or any(t not in LAYER_TYPES for t in types)):
        raise hub.CheckpointError(f"layer_types in {where} is not one of {', '.join(LAYER_TYPES)} per layer "
                                  f"(num_hidden_layers={d['num_hidden_layers']})")


def n_weights(d):
    """A lower bound on the number of weights of the model a checked config.json describes."""
    heads, hidden = d["num_attention_heads"], d["hidden_size"]
    kv, head_dim = d.get("num_key_value_heads") or heads, d.get("head_dim") or hidden // heads
    per_layer = 2 * hidden * head_dim * (heads + kv) + 3 * hidden * d["intermediate_size"]
    return d["vocab_size"] * hidden + d["num_hidden_layers"] * per_layer


def rope_from_hf(d, where):
    """(rope_theta, rope_scaling or None) from either form of config.json."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:  # transformers 5.x
        theta, scaling = params["rope_theta"], {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta, scaling = d.get("rope_theta", 10000.0), d.get("rope_scaling")
    if scaling is not None:
        scaling = dict(scaling)
        kind = scaling.pop("type", None) or scaling.get("rope_type", "default")
        scaling["rope_type"] = kind
        if kind not in ROPE_TYPES:
            raise hub.CheckpointError(f"unsupported rope type {kind!r} in {where}; supported: {', '.join(ROPE_TYPES)}")
        if kind == "default":
            scaling = None
        elif kind == "llama3":
            scaling.setdefault("original_max_position_embeddings", d.get("max_position_embeddings", 2048))
    return float(theta), scaling


def inv_freq(config):
    """The rotary frequencies (head_dim / 2,) float32, as transformers' modeling_rope_utils computes them."""
    dim = config.head_dim
    # on the CPU whatever the default device: a model built on the meta device computes them too
    freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    s = config.rope_scaling
    if s is None:
        return freq
    if s["rope_type"] == "linear":
        return freq / s["factor"]
    # llama3 (Llama 3.1): long wavelengths divided by `factor`, short ones kept, a smooth blend between
    factor, low, high, context = s["factor"], s["low_freq_factor"], s["high_freq_factor"], \
        s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freq
    scaled = torch.where(wavelen > context / low, freq / factor, freq)
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < context / high) * ~(wavelen > context / low)
    return torch.where(medium, blended, scaled)


@dataclass
class LlamaClassifierConfig(Labels, LlamaConfig):
    """A *ForSequenceClassification's config: the body's, plus its labels."""
    num_labels: int = 2
    id2label: dict | None = None  # {0: "NEGATIVE", 1: "POSITIVE"}; LABEL_i when None

    def __post_init__(self):
        super().__post_init__()
        self.set_labels()

    @classmethod
    def from_hf(cls, d, where="config.json"):
        body = LlamaConfig.from_hf(d, where)
        labels = d.get("id2label")
        if labels is not None and not (isinstance(labels, dict) and all(str(i).isdigit() for i in labels)):
            raise hub.CheckpointError(f"id2label in {where} is not a map from label numbers to names")
        return cls(**{f.name: getattr(body, f.name) for f in fields(LlamaConfig)}, id2label=d.get("id2label"))

    def to_hf(self):
        d = {k: v for k, v in super().to_hf().items() if k != "num_labels"}  # transformers counts id2label
        return {**d, "architectures": [f"{ARCHITECTURES[self.model_type]}ForSequenceClassification"],
                "id2label": {str(i): label for i, label in self.id2label.items()}, "label2id": self.label2id}
