"""
WARP with a verifiable reward, on a laptop: the tiny reproduction's SFT policy (a 2-layer GPT-2
trained on IMDB reviews) learns to write each prompt's keyword, rewarded 1 when its completion holds
the keyword of its row and 0 otherwise (rewards.py:keyword_reward, reading the `keyword` column of
prompts.jsonl). No reward model at all. Prints the keyword rate (the fraction of completions holding
their prompt's keyword) of the SFT policy and of the WARP policy, on the same prompts with the same
random numbers.

    python reproduce.py --source aclImdb_v1.tar.gz      # once: the tiny models, in runs/tiny
    python examples/rewards/keyword_warp.py --tiny runs/tiny

The job it runs is train.py's (resumable, in OUT/job.json), the same as

    python train.py --preset tiny --policy runs/tiny/sft --prompts examples/rewards/prompts.jsonl \\
        --reward_fn examples/rewards/rewards.py:keyword_reward --no_eos_penalty none \\
        --iterations 1 --runs 2 --steps 40 --batch_size 32 --max_new_tokens 24 --rloo_k 4 --out_dir runs/keyword

(the prompt file's other fields reach the reward function as columns: here `keyword`).
"""

import dataclasses
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), HERE]  # nanowarp, and rewards.py beside this file

from nanowarp.config import flag, parse_args as parse_flags  # noqa: E402
from nanowarp.data import load_prompt_dataset  # noqa: E402
from nanowarp.evaluate import batch_seed  # noqa: E402
from nanowarp.models import eos_ids, from_pretrained  # noqa: E402
from nanowarp.sampling import sample  # noqa: E402
from nanowarp.tokenizer import load_tokenizer  # noqa: E402
from nanowarp.warp import warp  # noqa: E402
from rewards import keyword_reward  # noqa: E402

PROMPTS = os.path.join(HERE, "prompts.jsonl")


@dataclasses.dataclass
class Args:
    tiny: str = flag("runs/tiny", "a reproduce.py output folder: its sft/ is the policy")
    out_dir: str = flag("runs/keyword", "the WARP job's folder")
    steps: int = flag(40, "RL steps per run")
    samples: int = flag(32, "completions per prompt for the keyword rate")
    seed: int = flag(0, "the job's and the rate's seed")


def job_config(args):
    """train.py's Config of the job (the command in the docstring)."""
    return parse_flags(["--preset", "tiny", "--policy", os.path.join(args.tiny, "sft"), "--prompts", PROMPTS,
                       "--reward_fn", os.path.join(HERE, "rewards.py") + ":keyword_reward", "--no_eos_penalty", "none",
                       "--iterations", "1", "--runs", "2", "--steps", str(args.steps), "--batch_size", "32",
                       "--max_new_tokens", "24", "--rloo_k", "4", "--out_dir", args.out_dir,
                       "--seed", str(args.seed), "--workers", "1"])


@torch.no_grad()
def keyword_rate(folder, prompts, keywords, tokenizer, cfg, args):
    """Fraction of `samples` completions per prompt, from the policy in `folder`, that hold their prompt's keyword."""
    model = from_pretrained(folder).eval()
    hits = []
    for i, (prompt, keyword) in enumerate(zip(prompts, keywords)):
        generator = torch.Generator().manual_seed(batch_seed(args.seed, i))  # the same for both policies
        out = sample(model, [prompt] * args.samples, cfg.max_new_tokens, eos_token_id=eos_ids(folder, model.config),
                     temperature=cfg.temperature, generator=generator)
        ends = (out.mask.sum(1) - out.finished.long()).tolist()
        completions = tokenizer.decode_batch([t[:n] for t, n in zip(out.tokens.tolist(), ends)],
                                             skip_special_tokens=True)
        hits += keyword_reward([], completions, [keyword] * args.samples)
    return sum(hits) / len(hits)


def parse_args(argv=None):
    return parse_flags(argv, Args, presets=None, description=__doc__)


def main(argv=None):
    args = parse_args(argv)
    cfg = job_config(args)
    tokenizer = load_tokenizer(cfg.policy)
    dataset = load_prompt_dataset(PROMPTS, tokenizer)  # the prompts, and their rows' `keyword` column
    prompts, keywords = dataset.ids, dataset.columns["keyword"]
    before = keyword_rate(cfg.policy, prompts, keywords, tokenizer, cfg, args)
    warp(cfg)  # the job reads the same file: its reward function gets the keyword column
    after = keyword_rate(os.path.join(args.out_dir, "iter_1", "liti"), prompts, keywords, tokenizer, cfg, args)
    print(f"keyword rate on {len(prompts)} prompts x {args.samples} completions: SFT {before:.3f} -> WARP {after:.3f}")


if __name__ == "__main__":
    main()
