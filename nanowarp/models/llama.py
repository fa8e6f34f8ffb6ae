"""
The Llama-layout decoder in one file: Llama (and SmolLM2), Qwen2, Mistral, Gemma and Gemma 2,
loading and writing their Hugging Face checkpoints (`*ForCausalLM`, `*ForSequenceClassification`).

References:
1) Touvron et al. 2023, "LLaMA" (RMSNorm, SwiGLU, rotary embeddings); Su et al. 2021, "RoFormer"
2) Ainslie et al. 2023, "GQA": key/value heads shared by groups of query heads
3) Gemma Team 2024, "Gemma" and "Gemma 2" (GeGLU, soft-capping, sliding-window layers)
4) transformers' modeling_llama.py, modeling_qwen2.py, modeling_mistral.py, modeling_gemma.py and
   modeling_gemma2.py, whose checkpoints this loads key for key; gpt-fast's model.py

What the families differ in is data (nanowarp/models/llama_config.py): biases, norms, activations, rope
frequencies, soft caps, windows. The interface is GPT-2's (nanowarp/models/gpt2.py): `model(idx,
attention_mask)` -> logits (B, T, V), `hidden_states`, `setup_caches` / `input_pos` for the
sampler's KV cache, `hf_state_dict` / `load_hf_state_dict`. Batches are left-padded, and each row's
rotary positions count from its first real token, so a padded row computes what it would alone.

Rounding follows transformers, so that fp32 logits agree to ~1e-6 and bf16 ones closely: norms
in fp32, rotary angles in fp32, Gemma's sqrt(d) embedding scale rounded to the model's dtype.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanowarp import hub
from nanowarp.memory import run_block, set_weights
from nanowarp.models import llama_config
from nanowarp.models.layers import (Decoder, Linear, classify, config_from_hf, load_pretrained, load_score,
                                    positions_and_mask)
from nanowarp.models.llama_config import LlamaClassifierConfig, LlamaConfig, inv_freq

ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}
# buffers some older checkpoints carry: not parameters, computed from the config
SKIPPED = (".rotary_emb.inv_freq",)


class RMSNorm(nn.Module):
    """x / rms(x) · w, in fp32; Gemma's scales by (1 + w) (its weights start at 0)."""

    def __init__(self, dim, eps, offset=False):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:  # Gemma: (x·(1 + w)) rounded once to x's dtype
            return (h * (1.0 + self.weight.float())).type_as(x)
        return self.weight * h.to(x.dtype)  # Llama: x rounded to its dtype, then times w


def rotate(x, cos, sin):
    """Rotary embedding of x (B, H, T, hd): pairs (x_i, x_{i + hd/2}) rotated by position · freq_i."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        d, H, KV, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.n_head, self.n_kv_head, self.head_dim = H, KV, hd
        self.q_proj = Linear(d, H * hd, bias=config.qkv_bias)
        self.k_proj = Linear(d, KV * hd, bias=config.qkv_bias)
        self.v_proj = Linear(d, KV * hd, bias=config.qkv_bias)
        self.o_proj = Linear(H * hd, d, bias=config.o_bias)
        self.sliding = config.is_sliding(layer)  # reads the model's sliding-window mask
        self.scale = config.query_pre_attn_scalar ** -0.5 if config.query_pre_attn_scalar else hd ** -0.5
        self.softcap = config.attn_logit_softcapping
        self.kv_cache = None

    def forward(self, x, cos, sin, mask, input_pos):
        B, T, _ = x.shape
        # contiguous: a no-op unless `linear` transposed (few rows), where it makes the rotation and
        # attention of a decoding step several times faster (SDPA takes a slow path on strided queries on a CPU)
        heads = lambda t, n: t.contiguous().view(B, T, n, self.head_dim).transpose(1, 2)  # noqa: E731
        q = heads(self.q_proj(x), self.n_head)  # (B, H, T, hd)
        k, v = heads(self.k_proj(x), self.n_kv_head), heads(self.v_proj(x), self.n_kv_head)  # (B, KV, T, hd)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
            k, v = k[:, :, :mask.size(-1)], v[:, :, :mask.size(-1)]  # the slots the mask covers
        if self.softcap is None:  # each key/value head serves its group of query heads (enable_gqa: no copies)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=True)
        else:  # Gemma 2: scores -> c·tanh(scores / c) before the softmax, which SDPA cannot do
            groups = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            scores = q @ k.transpose(-2, -1) * self.scale  # (B, H, T, S)
            scores = torch.tanh(scores / self.softcap) * self.softcap
            probs = scores.masked_fill(~mask, -float("inf")).softmax(-1, dtype=torch.float32).to(q.dtype)
            y = probs @ v
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    """SwiGLU (Llama) or GeGLU (Gemma): down(act(gate(x)) · up(x))."""

    def __init__(self, config):
        super().__init__()
        d, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(d, inner, bias=bias)
        self.up_proj = Linear(d, inner, bias=bias)
        self.down_proj = Linear(inner, d, bias=bias)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        norm = lambda: RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_offset)  # noqa: E731
        self.input_layernorm = norm()
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = norm()  # Llama: before the MLP; Gemma 2: on the attention's output
        self.mlp = MLP(config)
        self.sandwich = config.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def forward(self, x, cos, sin, mask, input_pos):
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos)
        if not self.sandwich:
            x = x + h
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(h)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Llama(Decoder):
    """The Llama-layout language model, `model.*`: token embeddings, rotary-position blocks, a final RMSNorm,
    and the LM head, tied to the embeddings or not (config.tie_word_embeddings)."""
    config_class = LlamaConfig  # what from_pretrained reads config.json into

    def __init__(self, config):
        super().__init__(config)
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList([Block(config, i) for i in range(config.num_hidden_layers)]),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_offset),
        ))
        self.add_lm_head(config.hidden_size)
        # rotary frequencies: a plain fp32 tensor, not a buffer, so that .to(bfloat16) leaves it fp32
        self.inv_freq = inv_freq(config)  # on the CPU, also when the model is built on the meta device
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    # ---- forward -------------------------------------------------------------------------------

    def hidden_states(self, idx, attention_mask=None, input_pos=None):
        """Final hidden states (B, T, hidden_size), after the final norm; arguments as GPT2's."""
        B, T = idx.shape
        cache = self.model.layers[0].self_attn.kv_cache
        if input_pos is None:
            input_pos = torch.arange(T, device=idx.device)
        pos, mask = positions_and_mask(attention_mask, input_pos, B, T if cache is None else cache.k_cache.size(2))
        S = mask.size(-1)
        masks = {False: mask}
        if self.config.sliding_window is not None:  # slots (= positions, within a row) less than a window back
            near = input_pos[:, None] - torch.arange(S, device=idx.device) < self.config.sliding_window
            masks[True] = mask & near
        x = self.model.embed_tokens(idx)
        if self.config.embed_scale:  # Gemma: sqrt(d), rounded to the model's dtype as transformers does
            x = x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)
        cos, sin = self._rotary(pos, x.dtype)
        for block in self.model.layers:
            x = run_block(self, block, x, cos, sin, masks[block.self_attn.sliding], input_pos)
        return self.model.norm(x)

    def _rotary(self, pos, dtype):
        """cos and sin (B, 1, T, head_dim) of the angles pos · inv_freq, computed in fp32."""
        if self.inv_freq.device != pos.device:
            self.inv_freq = self.inv_freq.to(pos.device)
        angles = pos[..., None].float() * self.inv_freq  # (B, T, hd/2)
        angles = torch.cat((angles, angles), dim=-1)[:, None]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, idx, attention_mask=None, input_pos=None):
        """Logits (B, T, vocab_size); Gemma 2's soft-capped."""
        logits = self.lm_head(self.hidden_states(idx, attention_mask, input_pos))
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def attentions(self):
        return [block.self_attn for block in self.model.layers]

    def cache_heads(self):
        return self.config.num_key_value_heads, self.config.head_dim

    def embedding(self):
        return self.model.embed_tokens

    # ---- Hugging Face checkpoints --------------------------------------------------------------

    def hf_state_dict(self, state_dict=None):
        """Weights in the Hugging Face layout, which is this module's: without lm_head when tied."""
        sd = self.state_dict() if state_dict is None else state_dict
        return {k: v for k, v in sd.items() if not (k == "lm_head.weight" and self.config.tie_word_embeddings)}

    def tie_weights(self):
        if self.config.tie_word_embeddings and self.lm_head is not None:
            self.lm_head.weight = self.model.embed_tokens.weight

    def load_hf_state_dict(self, state_dict, where="state dict", assign=False, device=None, dtype=None):
        """Load Hugging Face-layout weights. assign: into a model built on the meta device, taking
        the tensors (memory.set_weights)."""
        sd = {k: v for k, v in state_dict.items() if not k.endswith(SKIPPED)}
        if self.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)  # some tied checkpoints store the copy too
        expected = {k: v.shape for k, v in self.hf_state_dict().items()}
        hub.check_keys(expected, {k: v.shape for k, v in sd.items()}, where)
        set_weights(self, sd, assign, device, dtype)  # a tied lm_head.weight comes with embed_tokens
        self.tie_weights()  # again: assign gives embed_tokens a new tensor
        return self

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=torch.float32):
        """The model of a checkpoint (folder or Hub id), its weights in `dtype` (layers.load_pretrained)."""
        def read_config(d, where):
            llama_config.check(d, where)
            return config_from_hf(cls.config_class, d, where), llama_config.n_weights(d)
        return load_pretrained(cls, name_or_path, dtype, read_config)

    def save_pretrained(self, folder, state_dict=None):
        hub.save_weights(folder, self.config.to_hf(), self.hf_state_dict(state_dict))


class LlamaClassifier(Llama):
    """A sequence classifier in the layout of transformers' *ForSequenceClassification: `model.*`
    plus `score.weight` (num_labels, hidden_size), no LM head, read at each row's last real token."""
    config_class = LlamaClassifierConfig

    def __init__(self, config):
        super().__init__(config)
        self.lm_head = None
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        nn.init.normal_(self.score.weight, mean=0.0, std=0.02)

    def forward(self, input_ids, attention_mask=None):
        """input_ids (B, T), attention_mask (B, T) 1 = token, 0 = padding -> logits (B, num_labels)."""
        return classify(self, input_ids, attention_mask, "max_position_embeddings")

    def load_hf_state_dict(self, state_dict, where="state dict", assign=False, device=None, dtype=None):
        """The body, then `score.weight`; a language model's checkpoint (no head, its lm_head
        dropped) gets a fresh, randomly initialised head, with a warning."""
        state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
        score = state_dict.pop("score.weight", None)
        expected = {k: v.shape for k, v in self.hf_state_dict().items() if k != "score.weight"}
        sd = {k: v for k, v in state_dict.items() if not k.endswith(SKIPPED)}
        hub.check_keys(expected, {k: v.shape for k, v in sd.items()}, where)
        set_weights(self, sd, assign, device, dtype)
        load_score(self, score, where, self.model.embed_tokens.weight, assign, device, dtype)
        return self
