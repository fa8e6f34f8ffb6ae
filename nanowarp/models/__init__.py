"""
The one place that picks a model class: by config.json's `model_type`, GPT-2 (nanowarp/models/gpt2.py) or
the Llama layout (nanowarp/models/llama.py: llama, qwen2, mistral, gemma, gemma2). Every script and stage
loads its policies through `from_pretrained`, and WARP's weights θ (dense, in the Hugging Face
layout) go through `load_theta` and `save_policy`, whatever the architecture.

A checkpoint's stop tokens are config.json's eos_token_id, or generation_config.json's when the
folder has one (an int or a list: chat models stop at the end of a turn as well as at EOS).
"""

import json
import os
import shutil

import torch

from nanowarp import hub
from nanowarp.models.gpt2 import GPT2, GPT2Classifier, GPT2Config
from nanowarp.models.llama import Llama, LlamaClassifier
from nanowarp.models.llama_config import FAMILIES

LANGUAGE_MODELS = {"gpt2": GPT2, **{family: Llama for family in FAMILIES}}
CLASSIFIERS = {"gpt2": GPT2Classifier, **{family: LlamaClassifier for family in FAMILIES}}
# what save_policy copies next to the weights: the tokenizer and the generation settings (stop ids)
POLICY_FILES = hub.TOKENIZER_FILES + ("generation_config.json",)


def model_type(config_dict, where, table=LANGUAGE_MODELS):
    """config.json's model_type, if nanowarp has a class for it; else a CheckpointError."""
    name = config_dict.get("model_type")
    if name not in table:
        raise hub.CheckpointError(f"unknown model_type {name!r} in {where}: nanowarp runs "
                                  f"{', '.join(sorted(set(table)))}")
    return name


def load_config(name_or_path):
    """The model config (GPT2Config or LlamaConfig) of a checkpoint, by its model_type."""
    folder = hub.resolve(name_or_path, weights=False)
    d = hub.load_config(folder)
    where = os.path.join(folder, "config.json")
    return LANGUAGE_MODELS[model_type(d, where)].config_class.from_hf(d, where=where)


def from_config(config):
    """A freshly initialised language model of this config's architecture."""
    return (GPT2 if isinstance(config, GPT2Config) else Llama)(config)


def from_pretrained(name_or_path, dtype=torch.float32):
    """The language model of a checkpoint (folder or Hub id), of the class its model_type names, its
    weights in `dtype`. No random weights are drawn and no float32 copy is made of a bf16 model:
    the model is built on the meta device and takes the tensors read from the file, converted one
    at a time, shard by shard (hub.load_state_dict)."""
    folder = hub.resolve(name_or_path)
    where = os.path.join(folder, "config.json")
    return LANGUAGE_MODELS[model_type(hub.load_config(folder), where)].from_pretrained(folder, dtype)


def eos_ids(name_or_path, config):
    """The ids that end a completion: generation_config.json's eos_token_id (int or list) if the
    checkpoint has one, else config.json's. One id comes back as an int, several as a list."""
    path = os.path.join(hub.resolve(name_or_path, weights=False), "generation_config.json")
    eos = config.eos_token_id
    if os.path.isfile(path):
        try:
            with open(path) as f:
                eos = json.load(f).get("eos_token_id", eos)
        except json.JSONDecodeError as e:
            raise hub.CheckpointError(f"{path} is not valid JSON ({e})") from None
    if isinstance(eos, list):
        return eos[0] if len(eos) == 1 else eos
    return eos


# ---- policy checkpoints: dense weights θ in the Hugging Face layout, what WARP merges ----------

def load_theta(folder):
    """The dense weights θ of a checkpoint in the Hugging Face layout, as cpu_weights gives them."""
    return cpu_weights(from_pretrained(folder).hf_state_dict())


def cpu_weights(theta):
    """θ as detached, contiguous CPU tensors in its own key order: one form, whether the weights
    come from a file or from training."""
    return {k: v.detach().cpu().contiguous() for k, v in theta.items()}


def save_policy(folder, theta, config, tokenizer_folder, card=None, max_shard_bytes=hub.MAX_SHARD_BYTES):
    """A complete Hugging Face checkpoint: weights (sharded above max_shard_bytes), config, the
    policy's tokenizer files and generation_config.json, and the model card `card` (the text of
    README.md), if given."""
    if card is not None:
        hub.write_text(os.path.join(folder, "README.md"), card)
    for name in POLICY_FILES:
        src = os.path.join(tokenizer_folder, name)
        if os.path.isfile(src):
            hub.atomic_write(os.path.join(folder, name), lambda tmp: shutil.copyfile(src, tmp), os.path.getsize(src))
    hub.save_weights(folder, config.to_hf(), theta, max_shard_bytes)  # config.json last: the folder is complete
