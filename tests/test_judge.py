"""The judge: a sentiment classifier of another kind (GPT-2) loaded, scored and trained through
the same code as the DistilBERT reward model."""

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import REVIEWS, gpt2_classifier
from nanowarp.config import Config
from nanowarp.data import load_reviews
from nanowarp.hub import CheckpointError
from nanowarp.models.distilbert import DistilBertClassifier
from nanowarp.models.gpt2 import GPT2Classifier
from nanowarp.padding import right_pad
from nanowarp.reward import Reward, RewardModel, Texts, load_classifier
from nanowarp.supervised import train_reward_model
from nanowarp.tokenizer import load_tokenizer


def test_load_classifier_picks_the_kind_from_config_json(judge_dir, tiny_reward_dir, tiny_gpt2_dir, tmp_path):
    assert isinstance(load_classifier(judge_dir), GPT2Classifier)
    assert isinstance(load_classifier(tiny_reward_dir), DistilBertClassifier)
    shutil.copytree(judge_dir, tmp_path / "other")
    config = json.load(open(tmp_path / "other" / "config.json"))
    json.dump({**config, "model_type": "t5"}, open(tmp_path / "other" / "config.json", "w"))
    with pytest.raises(CheckpointError, match=r"unknown model_type 't5' in .*config\.json.*distilbert, gpt2, llama"):
        load_classifier(str(tmp_path / "other"))


def test_a_gpt2_judge_scores_like_transformers(judge_dir):
    transformers = pytest.importorskip("transformers")
    judge = RewardModel(judge_dir)
    texts = REVIEWS[:6]
    ids, mask = right_pad([e.ids for e in load_tokenizer(judge_dir).encode_batch(texts)], judge.pad_id)
    assert judge.pad_id not in ids[mask.bool()]  # transformers finds the last token by the pad id
    reference = transformers.GPT2ForSequenceClassification.from_pretrained(judge_dir).eval()
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits.softmax(-1)[:, 1]
    finished = torch.tensor([True, False] * 3)
    assert (judge.score(texts) - expected).abs().max() <= 1e-5  # no finished: a judge, no −1 rule
    rewards, _ = Reward([judge]).score(Texts(texts, texts, texts), finished)
    assert rewards.tolist()[1::2] == [-1.0] * 3  # as a reward model: the −1 rule


def test_train_reward_model_trains_a_gpt2_classifier(bpe_dir, prepared_imdb_dir, tmp_path):
    """Through the same loop as DistilBERT: right padding, truncation to the model's context (the
    reviews are longer than its 32 positions), a pad id set for transformers, tokenizer files kept."""
    model = gpt2_classifier(bpe_dir, pad=False)
    tokenizer = load_tokenizer(bpe_dir)
    texts, labels = load_reviews(prepared_imdb_dir, "train")
    assert max(len(e.ids) for e in tokenizer.encode_batch(texts)) > 32

    def train_loss(m):
        tokenizer.enable_truncation(32)
        ids, mask = right_pad([e.ids for e in tokenizer.encode_batch(texts)], 0)
        with torch.no_grad():
            return F.cross_entropy(m.eval()(ids, mask), torch.tensor(labels)).item()

    before = train_loss(model)
    cfg = Config(data=prepared_imdb_dir, out_dir=str(tmp_path), epochs=3.0, train_batch_size=4, train_lr=3e-3,
                 train_warmup=0, max_length=64, log_every=1)
    logs = []
    accuracy = train_reward_model(cfg, torch.device("cpu"), log=logs.append, model=model, tokenizer_folder=bpe_dir)
    assert 0 <= accuracy <= 1 and sum("reward model step" in line for line in logs) == 9  # 3 x 12 reviews / 4
    trained = load_classifier(str(tmp_path / "reward_model"))
    assert isinstance(trained, GPT2Classifier)
    assert trained.config.pad_token_id == trained.config.eos_token_id and trained.config.id2label[1] == "POSITIVE"
    assert train_loss(trained) < before
    assert {"vocab.json", "merges.txt", "tokenizer.json"} <= set(os.listdir(tmp_path / "reward_model"))
    assert RewardModel(str(tmp_path / "reward_model")).score(texts[:2]).shape == (2,)
