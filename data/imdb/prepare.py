"""
Prepare the IMDB data of the WARP task: prompts for the RL runs and labelled reviews for the
reward model, written into one folder (format: the docstring of nanowarp/data.py).

Run from the repository root:

    python data/imdb/prepare.py         # downloads the archive into data/imdb/cache, writes data/imdb/prepared
    python data/imdb/prepare.py --source aclImdb_v1.tar.gz --tokenizer lvwerra/gpt2-imdb --out data/imdb/prepared
"""

import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # repo root, for `nanowarp`

from nanowarp.config import fail, flag, parse_args as parse_flags  # noqa: E402
from nanowarp.data import IMDB_URL, DataError, prepare  # noqa: E402
from nanowarp.hub import CheckpointError  # noqa: E402


@dataclass
class Args:
    source: str = flag(IMDB_URL, "aclImdb_v1.tar.gz, the folder it extracts to, or a URL")
    tokenizer: str = flag("lvwerra/gpt2-imdb", "the policy's tokenizer: Hub id or local folder")
    out: str = flag("data/imdb/prepared", "folder to write the prepared files into")
    seed: int = flag(0, "seed of the prompt lengths")
    min_chars: int = flag(200, "prompts only from reviews this long (after cleaning)")
    n_eval: int = flag(100, "eval prompts: the first N filtered test reviews in eval order: the reference's 100 "
                            "(all negative), then positive and negative alike")
    min_prompt_len: int = flag(5, "shortest prompt, in tokens")
    max_prompt_len: int = flag(20, "longest prompt, in tokens")
    cache_dir: str = flag("data/imdb/cache", "where a downloaded archive is kept")


def parse_args(argv=None):
    return parse_flags(argv, Args, presets=None, description=__doc__.strip().split("\n\n")[0])


def main(argv=None):
    args = parse_args(argv)
    try:
        prepare(args.source, args.tokenizer, args.out, seed=args.seed, min_chars=args.min_chars, n_eval=args.n_eval,
                min_len=args.min_prompt_len, max_len=args.max_prompt_len, cache_dir=args.cache_dir)
    except (DataError, CheckpointError, OSError) as e:
        fail("prepare.py", e)


if __name__ == "__main__":
    main()
