"""
The tiny setting: WARP on real IMDB reviews on a laptop CPU, with models small enough to train
from scratch in minutes (`reproduce.py` runs it end to end).

- tokenizers trained on the IMDB training reviews with the `tokenizers` library: a byte-level
  BPE for the policy (GPT-2's design, `<|endoftext|>` as BOS/EOS/pad) and a lowercase WordPiece
  for the classifier (BERT's design, `[CLS] ... [SEP]`), each saved in the Hugging Face layout;
- a GPT-2-architecture policy and a DistilBERT-architecture reward model, built at random and
  trained by the ordinary SFT and reward-model stages (nanowarp/supervised.py);
- an independent judge, the "gold" reward of reward-overoptimisation studies: a sentiment
  classifier of another kind (GPT-2 architecture read at the last token, the policy's BPE)
  trained on the other half of the labelled reviews, used only to evaluate;
- WARP itself through train.py with the Config overrides in WARP below.

Everything is an ordinary checkpoint, so train.py, merge.py and eval.py take them unchanged.
The sizes are plain data; reproduce.py's flags override the ones a user may want to change.
"""

import dataclasses
import os

from tokenizers import pre_tokenizers, trainers

from nanowarp.config import PRESETS
from nanowarp.hub import atomic_write, write_json, write_text
from nanowarp.models.distilbert import DistilBertClassifier, DistilBertConfig
from nanowarp.models.gpt2 import GPT2, GPT2Classifier, GPT2ClassifierConfig, GPT2Config
from nanowarp.tokenizer import BERT_SPECIALS, EOS, byte_level_bpe, read_wordpiece, wordpiece

# ---- the tiny setting, as plain data -----------------------------------------------------------

POLICY_VOCAB = 4096  # byte-level BPE; the LM head is the largest cost of the tiny policy
REWARD_VOCAB = 8192  # lowercase WordPiece; a big vocabulary is cheap for a classifier (a lookup)

GPT2_ARCH = dict(n_layer=2, n_embd=128, n_head=4, n_positions=80)  # 0.93M weights, 0.52M of them wte

DISTILBERT_ARCH = dict(n_layers=1, dim=64, n_heads=2, hidden_dim=256, max_position_embeddings=256,
                       dropout=0.0, attention_dropout=0.0)  # 0.6M weights, 0.52M of them word embeddings

# Config overrides of `train.py --stage sft` (every weight trains: lora=False). Reviews are cut at
# a sentence end to fit 64 tokens with their EOS (supervised.fit_review): the SFT model learns to
# end a review after a sentence, and often has not yet within 40 new tokens (reward -1), as the
# reference's GPT-2 often has not within 128.
SFT = dict(epochs=1.0, train_batch_size=64, train_lr=2e-3, train_warmup=50, weight_decay=0.01, max_length=64)

# Config overrides of `train.py --stage reward`: big batches (faster per review on one thread, as
# measured in docs/reproduction.md#what-it-runs), a learning rate for training from
# scratch. Half a of the labelled reviews (the judge learns from half b), and two windows of 5-60
# words of each: the reward model scores texts of 10-80 tokens, and one trained on whole reviews
# alone is nearly binary on them. Weight decay 0.01, asked for (the stage's default is none): without it
# this recipe stalls at chance (loss 0.693 for all 587 steps, 50.0 % on the test reviews; measured
# 2026-11-30), with it the loss is 0.41 by step 150.
REWARD = dict(epochs=2.0, train_batch_size=128, train_lr=3e-3, train_warmup=20, weight_decay=0.01, max_length=256, train_split="a", windows=2)

# The judge: the SFT model's GPT-2 body with a classifier head read at the last token (one trained
# from scratch learns less in the same time: docs/reproduction.md#what-it-runs), the policy's tokenizer, half b of the
# labelled reviews and two windows of each
JUDGE = dict(epochs=1.0, train_batch_size=128, train_lr=1e-3, train_warmup=20, max_length=80, train_split="b", windows=2)

# Config overrides of `train.py` (WARP): `--preset tiny`, defined with the other presets
WARP = PRESETS["tiny"]

# The settings of reproduce.py (--setting): the WARP preset (and `steps`, T, where a setting shortens it), the
# jobs of each seed (name: Config overrides on top of the preset), the main job (the WARP whose iterations get
# LITI sweeps, a LERP and the claims), the best-of-N of the SFT model evaluated beside them, where the output
# goes, and the judge gain the setting aims at (drawn in the plot).
#   fast       the whole pipeline in ~12 minutes: 40 new tokens, where RL learns to end in time (reward
#              hacking: the independent judge sees no change in sentiment);
#   sentiment  60 new tokens, where the SFT model ends every completion, so only sentiment is left to
#              learn, and ten times the completions per run: WARP + RLOO and its fixed-anchor ablation;
#   demo       `make demo`: the sentiment setting with runs half as long (T = 300, μ = 1/300) and no
#              ablation, to see WARP move sentiment, with the judge agreeing, in ~25 minutes.
SETTINGS = {
    "fast": dict(preset="tiny", main="reinforce", out_dir="runs/tiny", best_of=(1, 2, 4, 8, 16), judge_target=0.30,
                 jobs={"reinforce": {}, "rloo": {"rloo_k": 4, "iterations": 2},
                       "fixed_anchor": {"anchor": "init", "iterations": 1}}),
    "sentiment": dict(preset="tiny_sentiment", main="rloo", out_dir="runs/sentiment", best_of=(1, 2, 4, 8, 16),
                      judge_target=0.10,
                      jobs={"rloo": {}, "fixed_anchor": {"anchor": "init", "iterations": 1}}),
    "demo": dict(preset="tiny_sentiment", main="rloo", out_dir="runs/demo", best_of=(1, 2, 4, 8, 16), judge_target=0.10,
                 steps=300, jobs={"rloo": {"ema_rate": 1 / 300}}),
}


def jobs(args):
    """The WARP jobs of each seed: every job of the setting, the fixed-anchor ablation only with --ablations."""
    return [job for job in SETTINGS[args.setting]["jobs"] if job != "fixed_anchor" or args.ablations]


def main_job(args):
    """The WARP job whose iterations get the LITI sweeps, the LERP and the claims."""
    return SETTINGS[args.setting]["main"]


def job_settings(args, job):
    """The Config overrides of seed job `job`: its setting's preset, the reproduction's budget flags, the job's own."""
    setting = SETTINGS[args.setting]
    return {**PRESETS[setting["preset"]], "steps": args.steps, "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens, **setting["jobs"][job]}


# ---- tokenizers --------------------------------------------------------------------------------

def train_bpe(texts, vocab_size, folder, model_max_length):
    """A GPT-2-style byte-level BPE trained on texts, saved as tokenizer.json plus GPT-2's own
    files (vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json)."""
    tok = byte_level_bpe()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    os.makedirs(folder, exist_ok=True)
    tok.model.save(folder)  # vocab.json, merges.txt
    atomic_write(os.path.join(folder, "tokenizer.json"), lambda tmp: tok.save(tmp))
    write_json(os.path.join(folder, "special_tokens_map.json"), {"bos_token": EOS, "eos_token": EOS, "unk_token": EOS})
    write_json(os.path.join(folder, "tokenizer_config.json"),
               {"tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length,
                "bos_token": EOS, "eos_token": EOS, "unk_token": EOS, "add_prefix_space": False})
    return tok


def continuation_pieces(tok, texts):
    """Every `##c` piece the WordPiece trainer will start from: each character that follows another
    within a word (after `tok`'s normalisation and pre-tokenisation), sorted."""
    chars = set()
    for text in texts:
        for word, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text)):
            chars.update(word[1:])
    return ["##" + c for c in sorted(chars)]


def train_wordpiece(texts, vocab_size, folder, model_max_length, lowercase=True):
    """A BERT-style WordPiece (lowercase by default) trained on texts, saved as vocab.txt, tokenizer_config.json
    and tokenizer.json (with the [CLS] ... [SEP] template), the same files in every run.

    Left alone, the trainer numbers the `##c` pieces it starts from in the order it meets them in a
    hash map seeded anew in each process; ties between merges are broken by those ids, so the
    vocabulary itself would differ from run to run. The pieces are therefore given to it up front,
    sorted, and the vocabulary is then renumbered: the special tokens, then every other token
    sorted. The tokenizer is read back from vocab.txt, as any BERT checkpoint's is."""
    tok = wordpiece(lowercase=lowercase)
    pieces = continuation_pieces(tok, texts)
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIALS + pieces, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    vocab = BERT_SPECIALS + sorted(set(tok.get_vocab()) - set(BERT_SPECIALS))
    os.makedirs(folder, exist_ok=True)
    write_text(os.path.join(folder, "vocab.txt"), "".join(t + "\n" for t in vocab))
    write_json(os.path.join(folder, "tokenizer_config.json"),
               {"tokenizer_class": "DistilBertTokenizer", "do_lower_case": lowercase, "model_max_length": model_max_length})
    tok = read_wordpiece(folder)
    atomic_write(os.path.join(folder, "tokenizer.json"), lambda tmp: tok.save(tmp))
    return tok


# ---- models ------------------------------------------------------------------------------------

def tiny_gpt2(tokenizer, **arch):
    """A randomly initialised GPT-2 for the BPE `tokenizer` (EOS doubles as BOS, as in GPT-2)."""
    eos = tokenizer.token_to_id(EOS)
    return GPT2(GPT2Config(vocab_size=tokenizer.get_vocab_size(), bos_token_id=eos, eos_token_id=eos, **arch))


def tiny_distilbert(tokenizer, **arch):
    """A randomly initialised DistilBERT sentiment classifier (0 = NEGATIVE, 1 = POSITIVE)."""
    return DistilBertClassifier(DistilBertConfig(vocab_size=tokenizer.get_vocab_size(),
                                                 pad_token_id=tokenizer.token_to_id("[PAD]"),
                                                 id2label={0: "NEGATIVE", 1: "POSITIVE"}, **arch))


def gpt2_classifier_from(lm):
    """A GPT-2 sentiment classifier (0 = NEGATIVE, 1 = POSITIVE; EOS pads) whose body holds the
    weights of the GPT-2 language model `lm`, and whose head (score.weight) is new."""
    config = GPT2ClassifierConfig(**dataclasses.asdict(lm.config), pad_token_id=lm.config.eos_token_id,
                                  id2label={0: "NEGATIVE", 1: "POSITIVE"})
    model = GPT2Classifier(config)
    GPT2.load_hf_state_dict(model, lm.hf_state_dict())  # the body alone: the head stays new, on purpose
    return model
