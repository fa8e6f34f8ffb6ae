"""
What RL can learn from the reward, measured at the SFT model before any RL runs (reproduce.py's
`diagnose` and `signal` stages): how the reward model and the judge read texts as short as the
completions, whether the SFT model's completions carry sentiment words at all, and how much of a
batch's policy gradient is signal rather than noise, for each reward.

Both read the checkpoints of a reproduction's folder: OUT/sft, OUT/reward_model, OUT/judge and the
prepared data OUT/data. Each returns {description: value as text}, as results.md lists them.
"""

import collections
import math
import os
import re

import numpy as np
import torch
import torch.nn.functional as F

from nanowarp.study import tiny
from nanowarp.data import load_prompts, load_reviews
from nanowarp.logprobs import completion_logprobs
from nanowarp.lora import add_lora
from nanowarp.models import from_pretrained
from nanowarp.reward import RewardModel
from nanowarp.rl import decode, rloo_advantages
from nanowarp.sampling import sample
from nanowarp.supervised import test_subset, word_windows
from nanowarp.tokenizer import load_tokenizer

WORD = re.compile(r"[a-z']+")


def sentiment_words(texts, labels, n=50, min_reviews=200):
    """The n words whose presence most separates positive from negative reviews (log-odds of the
    fraction of reviews of each label holding them; words in at least min_reviews reviews)."""
    df = [collections.Counter(), collections.Counter()]
    for text, label in zip(texts, labels):
        df[label].update(set(WORD.findall(text.lower())))
    count = [labels.count(0), labels.count(1)]
    words = [w for w in set(df[0]) | set(df[1]) if df[0][w] + df[1][w] >= min_reviews]
    odds = {w: math.log((df[1][w] + 1) / (count[1] + 2)) - math.log((df[0][w] + 1) / (count[0] + 2)) for w in words}
    ranked = sorted(words, key=lambda w: (-odds[w], w))
    return ranked[:n], ranked[::-1][:n]


@torch.no_grad()
def diagnose(out_dir, max_new_tokens, n_reviews=2000, n_prompts=512):
    """What the RL will see, measured before it runs: how the reward model and the judge read texts
    of the completions' length, and whether the SFT model's completions carry sentiment at all."""
    torch.manual_seed(0)
    data = os.path.join(out_dir, "data")
    texts, labels = test_subset(*load_reviews(data, "test"), n_reviews)
    windows, _ = word_windows(texts, labels, 1, 32, 32, seed=0)
    found, classifiers = {}, {"reward model": RewardModel(os.path.join(out_dir, "reward_model")),
                              "judge": RewardModel(os.path.join(out_dir, "judge"))}
    truth = torch.tensor(labels)
    for name, model in classifiers.items():
        whole, short = model.score(texts), model.score(windows)
        found[f"{name}: accuracy on whole test reviews / on 32-word windows of them"] = \
            f"{((whole > 0.5).long() == truth).float().mean():.3f} / {((short > 0.5).long() == truth).float().mean():.3f}"
    sft = from_pretrained(os.path.join(out_dir, "sft")).eval()
    tokenizer, eos = load_tokenizer(os.path.join(out_dir, "sft")), sft.config.eos_token_id
    prompts = load_prompts(data, "eval")[:n_prompts]
    completions, full = [], []
    for start in range(0, len(prompts), 64):
        batch = prompts[start:start + 64]
        sampled = sample(sft, batch, max_new_tokens, eos_token_id=eos, generator=torch.Generator().manual_seed(start))
        n = sampled.mask.sum(1)
        full += decode(tokenizer, batch, sampled.tokens, n)
        completions += tokenizer.decode_batch([t[:k] for t, k in zip(sampled.tokens.tolist(), n.tolist())],
                                              skip_special_tokens=True)
    reward, judged = classifiers["reward model"].score(full), classifiers["judge"].score(full)
    found["reward model's P(positive) of the SFT model's prompt + completion: mean, std, share < 0.1, share > 0.9"] = \
        f"{reward.mean():.3f}, {reward.std():.3f}, {(reward < 0.1).float().mean():.2f}, {(reward > 0.9).float().mean():.2f}"
    found["judge's P(positive) of the same: mean, std; correlation with the reward model"] = \
        f"{judged.mean():.3f}, {judged.std():.3f}; {np.corrcoef(reward.numpy(), judged.numpy())[0, 1]:.2f}"
    positive, negative = sentiment_words(*load_reviews(data, "train"))
    real = [" ".join(t.split()[10:10 + len(c.split())]) for t, c in zip(texts, completions)]  # as many words

    def share(snippets, words):  # the fraction of snippets holding one of the words
        return np.mean([any(w in set(WORD.findall(t.lower())) for w in words) for t in snippets])

    found["SFT completions holding one of the 50 most positive / most negative words"] = \
        f"{share(completions, positive):.2f} / {share(completions, negative):.2f} " \
        f"(real review text of the same length: {share(real, positive):.2f} / {share(real, negative):.2f})"
    found["the 10 most positive and negative words"] = f"{' '.join(positive[:10])} / {' '.join(negative[:10])}"
    return found


def gradient_signal(out_dir, max_new_tokens, n_batches=6, n_prompts=32, k=4):
    """The policy-gradient signal of each reward at the SFT model: the cosine between the LoRA gradients
    (the first step's: B = 0, so only B has one) of independent batches of n_prompts x k completions,
    with RLOO advantages. Near 0, a batch's gradient is mostly noise: RL then needs about 1/cos batches
    to move the policy along the reward. Rewards: the reward model's P(positive) alone (sentiment), the
    RL reward (with −1 without EOS), and the judge's P(positive)."""
    torch.manual_seed(0)
    sft_dir, cfg = os.path.join(out_dir, "sft"), tiny.WARP
    policy = add_lora(from_pretrained(sft_dir), cfg["lora_rank"], cfg["lora_alpha"])
    params = [p for p in policy.parameters() if p.requires_grad]
    tokenizer, eos = load_tokenizer(sft_dir), policy.config.eos_token_id
    reward_model, judge = (RewardModel(os.path.join(out_dir, name)) for name in ("reward_model", "judge"))
    prompts = load_prompts(os.path.join(out_dir, "data"), "train")
    order, generator = np.random.default_rng(0), torch.Generator().manual_seed(0)
    grads = collections.defaultdict(list)
    for _ in range(n_batches):
        batch = [prompts[i] for i in order.choice(len(prompts), n_prompts, replace=len(prompts) < n_prompts)
                 for _ in range(k)]
        with torch.no_grad():
            sampled = sample(policy, batch, max_new_tokens, eos_token_id=eos, generator=generator)
        texts = decode(tokenizer, batch, sampled.tokens, sampled.mask.sum(1))
        positive = reward_model.score(texts)
        for name, reward in (("reward model's P(positive) alone", positive),
                             ("the RL reward (−1 without EOS)", torch.where(sampled.finished, positive, torch.tensor(-1.0))),
                             ("the judge's P(positive)", judge.score(texts))):
            policy.zero_grad()
            logp = completion_logprobs(policy, sampled.prompt, sampled.prompt_mask, sampled.tokens, 1.0)
            (-(rloo_advantages(reward, k) * (logp * sampled.mask).sum(1)).mean()).backward()
            grads[name].append(torch.cat([p.grad.flatten() for p in params]))
    found = {}
    for name, g in grads.items():
        cos = [F.cosine_similarity(g[i], g[j], 0).item() for i in range(n_batches) for j in range(i + 1, n_batches)]
        found[name] = f"{np.mean(cos):+.3f} ± {np.std(cos) / math.sqrt(len(cos)):.3f}"
    return found
