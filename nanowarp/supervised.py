"""
The two supervised stages that precede WARP:

- the reward model: a DistilBERT fine-tuned as a binary sentiment classifier on the labelled
  IMDB reviews (reference settings: batch 32, AdamW lr 1.41e-5 decaying linearly to 0, 16-bit
  mixed precision on GPU, sequences truncated to 512 tokens);
- optionally the SFT policy: a GPT-2 fine-tuned with LoRA on the reviews (each followed by EOS),
  saved dense.

Both write ordinary Hugging Face checkpoints that train.py, merge.py and eval.py take.
"""

import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from nanowarp import hub
from nanowarp.data import load_reviews
from nanowarp.distilbert import DistilBertClassifier
from nanowarp.gpt2 import GPT2
from nanowarp.logprobs import token_logprobs
from nanowarp.lora import add_lora, effective_state_dict
from nanowarp.padding import right_pad
from nanowarp.rl import lr_factor
from nanowarp.tokenizer import load_tokenizer
from nanowarp.warp import save_policy


def batches(n, batch_size, epochs, seed):
    """Index batches over `epochs` (fractional allowed) shuffled passes of n examples."""
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(n) for _ in range(math.ceil(epochs))])[: int(epochs * n)]
    return [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]


def autocast(device):
    """16-bit mixed precision where it pays (bf16 on GPU); plain fp32 on the CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def accuracy(model, tokenizer, texts, labels, device, batch_size=64):
    model.eval()
    correct = 0
    for i in range(0, len(texts), batch_size):
        ids, mask = right_pad([e.ids for e in tokenizer.encode_batch(texts[i:i + batch_size])], 0, device)
        with autocast(device):
            correct += (model(ids, mask).argmax(-1).cpu() == torch.tensor(labels[i:i + batch_size])).sum().item()
    return correct / max(1, len(texts))


def train_reward_model(cfg, device, log=print, model=None, tokenizer_folder=None):
    """Fine-tune a sentiment classifier; writes OUT/reward_model and returns its test accuracy.
    `model` (a DistilBertClassifier) and `tokenizer_folder` replace cfg.reward_base when given."""
    folder = tokenizer_folder or hub.resolve(cfg.reward_base, weights=model is None)
    model = (model or DistilBertClassifier.from_pretrained(folder)).to(device)
    model.config.id2label = {0: "NEGATIVE", 1: "POSITIVE"}
    tokenizer = load_tokenizer(folder)
    tokenizer.no_padding()
    tokenizer.enable_truncation(min(cfg.max_length, model.config.max_position_embeddings))
    texts, labels = load_reviews(cfg.data, "train")
    steps = batches(len(texts), cfg.train_batch_size, cfg.epochs, cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 0, len(steps)))
    start = time.perf_counter()
    for step, idx in enumerate(steps, 1):
        model.train()
        ids, mask = right_pad([e.ids for e in tokenizer.encode_batch([texts[i] for i in idx])],
                              model.config.pad_token_id or 0, device)
        with autocast(device):
            loss = F.cross_entropy(model(ids, mask).float(), torch.tensor([labels[i] for i in idx], device=device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % cfg.log_every == 0 or step == len(steps):
            log(f"reward model step {step}/{len(steps)} | loss {loss.item():.4f} | {time.perf_counter() - start:.0f}s")
    test_texts, test_labels = load_reviews(cfg.data, "test")
    acc = accuracy(model, tokenizer, test_texts, test_labels, device)
    out = os.path.join(cfg.out_dir, "reward_model")
    model.save_pretrained(out)
    tokenizer.no_truncation()
    hub.atomic_write(os.path.join(out, "tokenizer.json"), lambda tmp: tokenizer.save(tmp))
    log(f"reward model: test accuracy {acc:.4f} on {len(test_texts)} reviews -> {out}")
    return acc


def lm_loss(model, ids, mask):
    """Mean next-token negative log-likelihood over real tokens (right-padded ids, mask)."""
    h = model.hidden_states(ids[:, :-1], mask[:, :-1])
    logp = token_logprobs(h, model.lm_head.weight, ids[:, 1:])
    target_mask = mask[:, 1:].float()
    return -(logp * target_mask).sum() / target_mask.sum()


def train_sft(cfg, device, log=print, model=None, tokenizer_folder=None, lora=True):
    """Fine-tune the policy on the training reviews, each followed by EOS; writes OUT/sft (dense)
    and returns the test perplexity. With lora=False every weight trains (e.g. from scratch)."""
    folder = tokenizer_folder or hub.resolve(cfg.policy)
    model = (model or GPT2.from_pretrained(folder)).to(device)
    if lora:
        add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
    tokenizer = load_tokenizer(folder)
    eos = model.config.eos_token_id
    max_len = min(cfg.max_length, model.config.n_positions)

    def encode(texts):
        return [e.ids[: max_len - 1] + [eos] for e in tokenizer.encode_batch(texts)]

    texts, _ = load_reviews(cfg.data, "train")
    steps = batches(len(texts), cfg.train_batch_size, cfg.epochs, cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train_lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, min(cfg.warmup, len(steps) // 10), len(steps)))
    start = time.perf_counter()
    for step, idx in enumerate(steps, 1):
        model.train()
        ids, mask = right_pad(encode([texts[i] for i in idx]), eos, device)
        with autocast(device):
            loss = lm_loss(model, ids, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % cfg.log_every == 0 or step == len(steps):
            log(f"sft step {step}/{len(steps)} | loss {loss.item():.4f} | {time.perf_counter() - start:.0f}s")
    ppl = perplexity(model, encode(load_reviews(cfg.data, "test")[0]), eos, device)
    out = os.path.join(cfg.out_dir, "sft")
    save_policy(out, effective_state_dict(model) if lora else model.hf_state_dict(), model.config, folder)
    log(f"sft: test perplexity {ppl:.2f} -> {out}")
    return ppl


@torch.no_grad()
def perplexity(model, seqs, pad_id, device, batch_size=32):
    model.eval()
    nll, count = 0.0, 0
    for i in range(0, len(seqs), batch_size):
        ids, mask = right_pad(seqs[i:i + batch_size], pad_id, device)
        n = mask[:, 1:].sum().item()
        nll += lm_loss(model, ids, mask).item() * n
        count += n
    return math.exp(nll / max(1, count))
