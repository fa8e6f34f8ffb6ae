"""
Prepare the IMDB data of the WARP task: prompts for the RL runs and labelled reviews for the
reward model, written into one folder (format: the docstring of nanowarp/data.py).

Run from the repository root:

    python data/imdb/prepare.py         # downloads the archive into data/imdb/cache, writes data/imdb/prepared
    python data/imdb/prepare.py --source aclImdb_v1.tar.gz --tokenizer lvwerra/gpt2-imdb --out data/imdb/prepared
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # repo root, for `nanowarp`

from nanowarp.data import IMDB_URL, DataError, prepare  # noqa: E402
from nanowarp.hub import CheckpointError  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--source", default=IMDB_URL, help="aclImdb_v1.tar.gz, the folder it extracts to, or a URL")
    p.add_argument("--tokenizer", default="lvwerra/gpt2-imdb", help="the policy's tokenizer: Hub id or local folder")
    p.add_argument("--out", default="data/imdb/prepared", help="folder to write the prepared files into")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt lengths")
    p.add_argument("--min_chars", type=int, default=200, help="prompts only from reviews this long (after cleaning)")
    p.add_argument("--n_eval", type=int, default=100, help="eval prompts: the first N filtered test reviews in eval order: the reference's 100 (all negative), then positive and negative alike")
    p.add_argument("--min_prompt_len", type=int, default=5, help="shortest prompt, in tokens")
    p.add_argument("--max_prompt_len", type=int, default=20, help="longest prompt, in tokens")
    p.add_argument("--cache_dir", default="data/imdb/cache", help="where a downloaded archive is kept")
    args = p.parse_args(argv)
    try:
        prepare(args.source, args.tokenizer, args.out, seed=args.seed, min_chars=args.min_chars, n_eval=args.n_eval,
                min_len=args.min_prompt_len, max_len=args.max_prompt_len, cache_dir=args.cache_dir)
    except (DataError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
