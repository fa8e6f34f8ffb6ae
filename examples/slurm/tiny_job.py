"""
A WARP job small enough to try a launcher with (examples/slurm/local_cluster.sh): a random 2-layer
GPT-2 and DistilBERT, as the tests build them, and a tiny IMDB of 24 reviews, written to FOLDER.
Prints the train.py flags that run it, without --out_dir:

    python examples/slurm/tiny_job.py /tmp/tiny      # then: python train.py $(...) --out_dir runs/tiny
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from nanowarp.data import prepare  # noqa: E402
from nanowarp.study import tiny  # noqa: E402

REVIEWS = [
    "This movie was absolutely wonderful, a joy from start to finish. The acting was superb.",
    "I hated every minute of it. The plot made no sense and the dialogue was wooden.",
    "A masterpiece of modern cinema! Beautiful cinematography, a haunting score, great performances.",
    "Worst film I've seen this year. Don't waste your money on this garbage.",
    "Loved the characters and the story. My kids enjoyed it too. Highly recommended!",
    "Boring, predictable, too long. I fell asleep twice before the ending finally came.",
]

# the tests' tiny job (tests/conftest.py): I = 2, M = 2, 3 steps of 4 completions of 8 tokens, one thread
FLAGS = ["--iterations", "2", "--runs", "2", "--steps", "3", "--batch_size", "4", "--max_new_tokens", "8",
         "--lora_rank", "2", "--warmup", "1", "--lr", "1e-2", "--device", "cpu", "--threads", "1"]


def main(folder):
    imdb, policy, reward, data = (os.path.join(folder, name) for name in ("imdb", "policy", "reward", "data"))
    for split in ("train", "test"):  # aclImdb/{train,test}/{neg,pos}/ID_RATING.txt
        for label, rating in (("neg", 2), ("pos", 9)):
            os.makedirs(os.path.join(imdb, "aclImdb", split, label), exist_ok=True)
            for i, text in enumerate(REVIEWS):
                with open(os.path.join(imdb, "aclImdb", split, label, f"{i}_{rating}.txt"), "w") as f:
                    f.write(f"{split} {label} {i}: {text}")
    torch.manual_seed(0)
    bpe = tiny.train_bpe(REVIEWS, 400, policy, 128)
    tiny.tiny_gpt2(bpe, n_layer=2, n_embd=32, n_head=4, n_positions=128).save_pretrained(policy)
    wordpiece = tiny.train_wordpiece(REVIEWS, 300, reward, 512)
    tiny.tiny_distilbert(wordpiece, n_layers=2, dim=32, n_heads=4, hidden_dim=64,
                         max_position_embeddings=256).save_pretrained(reward)
    prepare(imdb, policy, data, min_chars=0, n_eval=4, cache_dir=os.path.join(folder, "cache"), log=lambda *a: None)
    print(" ".join(["--policy", policy, "--reward_model", reward, "--data", data] + FLAGS))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.strip())
    main(sys.argv[1])
