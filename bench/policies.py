"""
The policies the benchmarks compare on, chosen by their `--model` flag, each built twice with the
same random weights: in nanowarp and in transformers (the `generate`, TRL and reference-way
contenders).

- gpt2:    GPT-2 124M (nanowarp.models.gpt2.GPT2Config's defaults), transformers' GPT2LMHeadModel;
- smollm2: a Llama of SmolLM2-135M's shape, transformers' LlamaForCausalLM. The numbers are those
           of the config.json of HuggingFaceTB/SmolLM2-135M on the Hugging Face Hub (copied here,
           nothing is downloaded): hidden size 576, 30 layers, 9 query heads sharing 3 key/value
           heads (head dim 64), SwiGLU MLP of width 1536, vocabulary 49,152, rope_theta 100,000,
           RMSNorm eps 1e-5, embeddings tied to the LM head, 8,192 positions: 135M parameters,
           against GPT-2's 124M, in 30 layers instead of 12.

`parity` checks that the two builds compute the same thing before anything is timed.
"""

import torch

from nanowarp.lora import default_targets
from nanowarp.models.gpt2 import GPT2Config
from nanowarp.models.llama_config import LlamaConfig, inv_freq

MODELS = ("gpt2", "smollm2")
SMOLLM2_135M = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0, hidden_act="silu",
                    tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
# the LoRA targets of every linear of the blocks, in peft's names (GPT-2's Conv1D stores [in, out])
PEFT_TARGETS = {"gpt2": (["c_attn", "c_proj", "c_fc"], True),
                "llama": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False)}


# a model of each --model's layout small enough for the test suite (SmolLM2's 3 query heads per key head kept)
SMOKE = {"gpt2": dict(vocab_size=500, n_embd=32, n_head=4),
         "smollm2": dict(vocab_size=500, hidden_size=48, intermediate_size=64, num_attention_heads=6, num_key_value_heads=2)}


def policy_config(model, **overrides):
    """nanowarp's config of a --model, its fields (transformers' names for smollm2) overridden."""
    if model not in MODELS:
        raise SystemExit(f"unknown --model {model!r}: choose from {', '.join(MODELS)}")
    if model == "gpt2":
        return GPT2Config(**overrides)
    return LlamaConfig.from_hf({**SMOLLM2_135M, **overrides})


def family(config):
    return "gpt2" if isinstance(config, GPT2Config) else "llama"


def hf_model(theta, config):
    """transformers' model of this config (GPT2LMHeadModel or LlamaForCausalLM) holding the dense
    weights theta (Hugging Face layout), with `generate`'s pad id set."""
    import transformers
    hf_config = {k: v for k, v in config.to_hf().items() if k != "architectures"}
    if family(config) == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config))
    missing, unexpected = model.load_state_dict(theta, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # lm_head: tied
    eos = config.eos_token_id
    model.generation_config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return model


@torch.no_grad()
def parity(hf, model, seed=0):
    """One forward of each gives the same logits (fp32); for a Llama, also the same rotary
    frequencies (both read rope_theta alike)."""
    idx = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(hf(idx).logits, model(idx), rtol=1e-4, atol=1e-4)
    if family(model.config) == "llama":
        torch.testing.assert_close(hf.model.rotary_emb.inv_freq, inv_freq(model.config))


def block_linears(model):
    """The linear layers of the transformer blocks (those LoRA adapts), in the model's order."""
    return [model.get_submodule(name) for name in default_targets(model)]


def width(config):
    return config.n_embd if family(config) == "gpt2" else config.hidden_size
