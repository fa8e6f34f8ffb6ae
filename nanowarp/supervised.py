"""
The two supervised stages that precede WARP:

- the reward model: a DistilBERT fine-tuned as a binary sentiment classifier on the labelled
  IMDB reviews (reference settings: batch 32, AdamW lr 1.41e-5 decaying linearly to 0, 16-bit
  mixed precision on GPU, sequences truncated to 512 tokens);
- optionally the SFT policy: a GPT-2 (or any policy models.from_pretrained loads) fine-tuned
  with LoRA on the reviews (each followed by EOS), saved dense.

Both write ordinary Hugging Face checkpoints that train.py, merge.py and eval.py take. Like the RL
runs, both stop at the end of a step on SIGINT / SIGTERM and, with --save_every N, save their
training state to OUT/{reward_model,sft}/state.pt, from which the same command continues (fit).
"""

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F

from nanowarp import hub
from nanowarp.card import model_card, write_card
from nanowarp.data import load_reviews
from nanowarp.jobs.folder import kill_point, move_aside, read_state, write_state
from nanowarp.logger import progress
from nanowarp.fast.logprobs import fused_token_logprobs
from nanowarp.logprobs import final_softcap
from nanowarp.lora import add_lora, effective_state_dict, named_targets
from nanowarp.models import eos_ids, from_pretrained, save_policy
from nanowarp.models.distilbert import DistilBertClassifier
from nanowarp.optim import adamw
from nanowarp.padding import right_pad
from nanowarp.reward import load_classifier
from nanowarp.sampling import first_eos
from nanowarp.signals import Interrupted, stop_requested
from nanowarp.tokenizer import load_tokenizer


def batches(n, batch_size, epochs, seed):
    """Index batches over `epochs` (fractional allowed) shuffled passes of n examples."""
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(n) for _ in range(math.ceil(epochs))])[: int(epochs * n)]
    return [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]


def grouped_batches(sizes, batch_size, epochs, seed):
    """batches() over each group of examples (groups of `sizes`, indexed one after the other), all
    the batches in one shuffled order; a batch holds one group's examples only (texts of similar
    lengths pad little). One group gives exactly batches(n, ...)."""
    if len(sizes) == 1:
        return batches(sizes[0], batch_size, epochs, seed)
    offsets = np.cumsum([0, *sizes[:-1]])
    out = [[i + offset for i in b] for g, (n, offset) in enumerate(zip(sizes, offsets))
           for b in batches(n, batch_size, epochs, seed + g)]
    return [out[i] for i in np.random.default_rng(seed).permutation(len(out))]


def split_half(texts, labels, half):
    """All the reviews, or half a (even positions) or b (odd positions): disjoint halves with both
    labels in each (the reviews are sorted by label)."""
    if half == "all":
        return texts, labels
    start = "ab".index(half)
    return texts[start::2], labels[start::2]


def word_windows(texts, labels, n, min_words, max_words, seed):
    """n windows of each text, each of k ~ U{min_words..max_words} consecutive words (the whole text
    if shorter) at a uniformly drawn start, labelled as their text."""
    rng = np.random.default_rng(seed)
    windows, window_labels = [], []
    for text, label in zip(texts, labels):
        words = text.split()
        for _ in range(n):
            k = min(len(words), int(rng.integers(min_words, max_words + 1)))
            start = int(rng.integers(0, len(words) - k + 1))
            windows.append(" ".join(words[start:start + k]))
            window_labels.append(label)
    return windows, window_labels


def autocast(device):
    """16-bit mixed precision where it pays (bf16 on GPU); plain fp32 on the CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def accuracy(model, tokenizer, texts, labels, device, batch_size=64):
    model.eval()
    correct = 0
    for i in progress(range(0, len(texts), batch_size), "test accuracy", unit="batch"):
        ids, mask = right_pad([e.ids for e in tokenizer.encode_batch(texts[i:i + batch_size])], 0, device)
        with autocast(device):
            correct += (model(ids, mask).argmax(-1).cpu() == torch.tensor(labels[i:i + batch_size])).sum().item()
    return correct / max(1, len(texts))


def test_subset(texts, labels, limit):
    """Every review, or `limit` of them evenly spaced (the split is sorted by label: both stay)."""
    if limit is None or limit >= len(texts):
        return texts, labels
    idx = np.linspace(0, len(texts) - 1, limit).round().astype(int)
    return [texts[i] for i in idx], [labels[i] for i in idx]


def warmup_steps(cfg, total):
    """cfg.train_warmup steps of linear warm-up, at most a tenth of the run."""
    return min(cfg.train_warmup, total // 10)


# ---- the training loop, which stops at a step's end and resumes from its saved state ----------

def plan(model, steps, cfg, grad_clip):
    """What a saved state is only valid for: the model it started from (a digest of its weights), the
    batches in order and the optimizer's settings."""
    weights = hashlib.sha256()
    for name, t in model.state_dict().items():
        weights.update(name.encode())
        weights.update(t.detach().cpu().contiguous().view(torch.uint8).numpy())
    batches = hashlib.sha256(json.dumps(steps, default=int).encode()).hexdigest()[:16]
    return dict(weights=weights.hexdigest()[:16], batches=batches, steps=len(steps), lr=cfg.train_lr,
                weight_decay=cfg.weight_decay, warmup=warmup_steps(cfg, len(steps)), grad_clip=grad_clip)


def resume_state(path, trained, opt, sched, expected, name, log, device):
    """Load the training state at `path` into the trained parameters, AdamW and its schedule and the
    random generators; returns the steps it had done (0 without a state). A state saved with other
    settings is refused; one that cannot be read (or whose bytes changed) is moved aside."""
    if not os.path.isfile(path):
        return 0
    try:
        state = read_state(path)
        keys = {"step", "plan", "params", "optimizer", "scheduler", "torch_rng", "cuda_rng"}
        if not keys <= state.keys() or state["params"].keys() != trained.keys() or not isinstance(state["plan"], dict):
            raise hub.CheckpointError(f"{path} is not a training state of this stage")
    except (hub.CheckpointError, AttributeError) as e:  # AttributeError: not a dict at all
        log(f"{name}: damaged: {e}; moved aside to {move_aside(path)}: the stage starts over")
        return 0
    differing = [f"{k} {state['plan'].get(k)} (now {v})" for k, v in expected.items() if state["plan"].get(k) != v]
    if differing:
        raise ValueError(f"{path} holds the training state of a {name} run with other settings: "
                         f"{', '.join(differing)}. Run that command again to resume it, or delete {path} to start over")
    with torch.no_grad():
        for n, p in trained.items():
            p.copy_(state["params"][n])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])  # dropout
    if state["cuda_rng"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    log(f"{name}: resuming at step {state['step']} from {path}")
    return state["step"]


def fit(model, params, steps, loss_fn, cfg, device, name, log, grad_clip=None, out=None):
    """The supervised loop of both stages: one AdamW step on `params` per batch of example indices
    in `steps`, on the mean loss `loss_fn(indices)`; learning rate cfg.train_lr, linear warm-up
    (warmup_steps) then linear decay to 0; the gradient norm clipped to grad_clip when given.

    With `out` (the stage's folder), the training state (trained weights, AdamW, schedule, random
    generators, steps done) goes to OUT/state.pt every cfg.save_every steps, and a state found there
    is continued from: the weights are those of a run never stopped (bit for bit on a CPU). After a
    SIGINT / SIGTERM (signals.stop_requested) the loop saves that state (with save_every) and raises
    signals.Interrupted at the end of the step, unless that was the last one."""
    opt, sched = adamw(params, cfg.train_lr, cfg.weight_decay, warmup_steps(cfg, len(steps)), len(steps))
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    path = out and os.path.join(out, "state.pt")
    done, expected = 0, None
    if out and (cfg.save_every or os.path.isfile(path)):  # a state to save, or to continue from
        expected = plan(model, steps, cfg, grad_clip)
        done = resume_state(path, trained, opt, sched, expected, name, log, device)
    start = time.perf_counter()
    for step, idx in enumerate(progress(steps[done:], name, unit="step"), done + 1):
        model.train()
        with autocast(device):
            loss = loss_fn(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        sched.step()
        if step % cfg.log_every == 0 or step == len(steps):
            log(f"{name} step {step}/{len(steps)} | loss {loss.item():.4f} | {time.perf_counter() - start:.0f}s")
        if out:
            kill_point(f"{os.path.basename(out)}/step_{step}")
        stop = stop_requested() if step < len(steps) else 0  # SIGINT / SIGTERM: stop after this step
        save = out and cfg.save_every and step < len(steps) and (step % cfg.save_every == 0 or stop)
        if save:
            write_state(dict(step=step, plan=expected, params={n: p.detach() for n, p in trained.items()},
                                optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                                torch_rng=torch.get_rng_state(),
                                cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None), path)
        if stop:
            log(f"{name}: stopped after step {step}/{len(steps)}; " + (f"its training state is in {path}" if save
                else "it will start over (--save_every N would have saved its state)"))
            raise Interrupted(stop, step)


def remove_state(out):
    """The stage's checkpoint is saved: its training state is no use."""
    for name in ("state.pt", "state.pt.sha256"):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))


def train_reward_model(cfg, device, log=print, model=None, tokenizer_folder=None, test_limit=None,
                       name="reward_model"):
    """Fine-tune a sentiment classifier; writes OUT/`name` and returns its test accuracy
    (on every test review, or on `test_limit` of them, evenly spaced). `model` (a
    DistilBertClassifier, GPT2Classifier or LlamaClassifier, e.g. a fresh one to train from scratch) and
    `tokenizer_folder` replace cfg.reward_base when given."""
    folder = tokenizer_folder or hub.resolve(cfg.reward_base, weights=model is None)
    base = cfg.reward_base if model is None else "(none: trained from scratch)"
    if model is None:
        torch.manual_seed(cfg.seed)  # a new head's initialisation, dropout: the stage is a function of its flags
    model = (model or load_classifier(folder)).to(device)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    model.config.id2label = {0: "NEGATIVE", 1: "POSITIVE"}
    if not isinstance(model, DistilBertClassifier) and model.config.pad_token_id is None:
        # training masks padding whatever its id; transformers finds a decoder's last token by this id
        model.config.pad_token_id = first_eos(model.config.eos_token_id)
    tokenizer = load_tokenizer(folder)
    tokenizer.no_padding()
    tokenizer.enable_truncation(min(cfg.max_length, model.config.max_position_embeddings))
    texts, labels = split_half(*load_reviews(cfg.data, "train"), cfg.train_split)
    sizes = [len(texts)]
    if cfg.windows:
        windows, window_labels = word_windows(texts, labels, cfg.windows, cfg.min_window_words,
                                              cfg.max_window_words, cfg.seed)
        texts, labels, sizes = texts + windows, labels + window_labels, sizes + [len(windows)]

    def loss(idx):  # cross-entropy of the labels, on right-padded texts
        ids, mask = right_pad([e.ids for e in tokenizer.encode_batch([texts[i] for i in idx])],
                              model.config.pad_token_id or 0, device)
        return F.cross_entropy(model(ids, mask).float(), torch.tensor([labels[i] for i in idx], device=device))

    out = os.path.join(cfg.out_dir, name)
    fit(model, list(model.parameters()), grouped_batches(sizes, cfg.train_batch_size, cfg.epochs, cfg.seed), loss,
        cfg, device, name.replace("_", " "), log, out=out)
    # save first: scoring 25,000 test reviews takes minutes, and a crash then must not lose the model
    for file in (n for n in hub.TOKENIZER_FILES if n != "tokenizer.json"):  # for transformers
        if os.path.isfile(os.path.join(folder, file)):
            hub.atomic_write(os.path.join(out, file), lambda tmp: shutil.copyfile(os.path.join(folder, file), tmp))
    tokenizer.no_truncation()  # the saved tokenizer: its users choose their own length
    hub.atomic_write(os.path.join(out, "tokenizer.json"), lambda tmp: tokenizer.save(tmp))
    tokenizer.enable_truncation(min(cfg.max_length, model.config.max_position_embeddings))
    model.save_pretrained(out)  # config.json, then checksums.sha256: the folder is complete
    remove_state(out)
    test_texts, test_labels = test_subset(*load_reviews(cfg.data, "test"), test_limit or cfg.test_limit or None)
    log(f"reward model saved to {out}; scoring {len(test_texts)} test reviews (--test_limit N scores fewer)")
    acc = accuracy(model, tokenizer, test_texts, test_labels, device)
    write_card(out, model_card(f"nanowarp reward model: {out}", f"A sentiment classifier (labels NEGATIVE, POSITIVE) "
                               f"fine-tuned by `train.py --stage reward` on the labelled IMDB training reviews.",
                               base, dataclasses.asdict(cfg),
                               dict(test_accuracy=acc, test_reviews=len(test_texts))))
    hub.seal(out)  # again, with the model card
    log(f"reward model: test accuracy {acc:.4f} on {len(test_texts)} reviews -> {out}")
    return acc


def lm_loss(model, ids, mask):
    """Mean next-token negative log-likelihood over real tokens (right-padded ids, mask)."""
    h = model.hidden_states(ids[:, :-1], mask[:, :-1])
    logp = fused_token_logprobs(h, model.lm_head.weight, ids[:, 1:], softcap=final_softcap(model))
    target_mask = mask[:, 1:].float()
    return -(logp * target_mask).sum() / target_mask.sum()


def fit_review(encoding, text, limit, eos):
    """A review's token ids followed by EOS, in at most `limit` tokens. A longer review is cut after
    its last sentence that fits, so that EOS always follows the end of a sentence, as it does at
    the end of a review (a cut mid-sentence would teach the model to stop at one fixed position,
    whatever it says); without a sentence end in the window, it is cut at the limit."""
    ids = encoding.ids
    if len(ids) < limit:
        return ids + [eos]
    for n in range(limit - 1, 0, -1):  # keep ids[:n]
        start, end = encoding.offsets[n - 1]
        if text[start:end].rstrip("\"')] ").endswith((".", "!", "?")):
            return ids[:n] + [eos]
    return ids[:limit - 1] + [eos]


def train_sft(cfg, device, log=print, model=None, tokenizer_folder=None, lora=True, test_limit=None):
    """Fine-tune the policy on the training reviews, each followed by EOS (cut to cfg.max_length
    tokens at a sentence end: fit_review); writes OUT/sft (dense) and returns the test perplexity
    (every test review, or `test_limit` of them, evenly spaced). With lora=False every weight
    trains (e.g. a fresh `model`, from scratch)."""
    folder = tokenizer_folder or hub.resolve(cfg.policy)
    from_base = model is None
    model = (model or from_pretrained(folder)).to(device)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    if from_base:
        torch.manual_seed(cfg.seed)  # LoRA's initialisation and dropout (a given `model`: the caller seeds)
    if lora:
        add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, named_targets(model, cfg.lora_targets))
    tokenizer = load_tokenizer(folder)
    eos = first_eos(eos_ids(folder, model.config))  # the one that ends each review
    max_len = min(cfg.max_length, model.config.n_positions)

    def encode(texts):
        return [fit_review(e, text, max_len, eos) for e, text in zip(tokenizer.encode_batch(texts), texts)]

    texts, _ = load_reviews(cfg.data, "train")

    def loss(idx):  # next-token NLL of the reviews, each followed by EOS, right-padded with EOS
        return lm_loss(model, *right_pad(encode([texts[i] for i in idx]), eos, device))

    out = os.path.join(cfg.out_dir, "sft")
    fit(model, [p for p in model.parameters() if p.requires_grad],
        batches(len(texts), cfg.train_batch_size, cfg.epochs, cfg.seed), loss, cfg, device, "sft", log, grad_clip=1.0,
        out=out)
    test_texts = test_subset(*load_reviews(cfg.data, "test"), test_limit or cfg.test_limit or None)[0]
    ppl = perplexity(model, encode(test_texts), eos, device)
    card = model_card(f"nanowarp SFT policy: {out}", "A GPT-2 fine-tuned by `train.py --stage sft` on the IMDB training "
                      "reviews, each followed by EOS" + (" (LoRA, folded into dense weights)." if lora else "."),
                      cfg.policy if from_base else "(none: trained from scratch)", dataclasses.asdict(cfg),
                      dict(test_perplexity=ppl, test_reviews=len(test_texts)))
    save_policy(out, effective_state_dict(model) if lora else model.hf_state_dict(), model.config, folder, card)
    remove_state(out)
    log(f"sft: test perplexity {ppl:.2f} -> {out}")
    return ppl


@torch.no_grad()
def perplexity(model, seqs, pad_id, device, batch_size=32):
    model.eval()
    nll, count = 0.0, 0
    for i in progress(range(0, len(seqs), batch_size), "test perplexity", unit="batch"):
        ids, mask = right_pad(seqs[i:i + batch_size], pad_id, device)
        n = mask[:, 1:].sum().item()
        nll += lm_loss(model, ids, mask).item() * n
        count += n
    return math.exp(nll / max(1, count))
