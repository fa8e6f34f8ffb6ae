"""
Train with WARP (Ramé et al. 2024) on IMDB: I iterations of M RL runs, merged by SLERP and
interpolated towards the initialisation (LITI). Also the two stages before it:

    python train.py --stage reward --data data/imdb/prepared --out_dir runs/rm   # the reward model
    python train.py --stage sft --data data/imdb/prepared --out_dir runs/sft     # optional SFT
    python train.py --data data/imdb/prepared --out_dir runs/warp                # WARP itself
    python train.py --data data/imdb/prepared --out_dir runs/warp --workers 2    # M runs side by side
    torchrun --nproc_per_node=2 train.py --data data/imdb/prepared --out_dir runs/warp   # or over ranks

Running the same command again resumes an interrupted job (docs/robustness.md#resuming-a-job).

`python train.py --help` lists every hyperparameter with its default (SPEC §2).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run from anywhere without installing

from nanowarp.config import parse_args, resolve_device, user_error, validate  # noqa: E402
from nanowarp.data import DataError  # noqa: E402
from nanowarp.hub import CheckpointError, DiskFullError  # noqa: E402
from nanowarp.jobs.folder import lock_out_dir  # noqa: E402
from nanowarp.jobs.parallel import WorkerError  # noqa: E402
from nanowarp.signals import Interrupted, stop_on_signals  # noqa: E402
from nanowarp.supervised import train_reward_model, train_sft  # noqa: E402
from nanowarp.warp import warp  # noqa: E402


def main(argv=None):
    cfg = parse_args(argv, description=__doc__.strip())
    try:
        validate(cfg)
        # Ctrl-C / SIGTERM: stop at the end of a step; a torchrun rank gets the signal from torchrun
        with stop_on_signals(main=int(os.environ.get("WORLD_SIZE", "1")) == 1):
            if cfg.stage == "reward":
                with lock_out_dir(cfg.out_dir):
                    train_reward_model(cfg, resolve_device(cfg.device))
            elif cfg.stage == "sft":
                with lock_out_dir(cfg.out_dir):
                    train_sft(cfg, resolve_device(cfg.device))
            else:
                warp(cfg)
    except Interrupted as e:
        if cfg.stage == "warp":
            torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1  # only the root rank writes, its own run's state
            saved = "" if not cfg.save_every else ("the root rank's run in progress saved its training state, "
                                                   if torchrun else "the runs in progress saved their training state, ")
            done = f"the finished runs are on disk, {saved}"
        else:
            done = "its training state is saved, " if cfg.save_every else "nothing is saved (--save_every N saves it), "
        print(f"train.py: {e}: {done}run the same command again to resume", file=sys.stderr)
        return e.exit_code  # 130 (SIGINT) or 143 (SIGTERM)
    except (ValueError, CheckpointError, DataError, FloatingPointError, WorkerError, DiskFullError) as e:
        return user_error("train.py", e)  # 2
    return 0


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A torchrun rank, its results written and its process group destroyed: leave without the
        # interpreter's teardown. A gloo rank occasionally aborted once the job was done ("terminate
        # called without an active exception": 2 of some 60 runs on 2 CPU cores), most likely there.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
