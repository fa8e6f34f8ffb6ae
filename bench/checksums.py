"""
What checksums.sha256 costs (nanowarp/checksums.py): a GPT-2 124M checkpoint (random weights, nothing
downloaded) saved without and with it (and the checksums alone, hub.seal), loaded by
GPT2.from_pretrained without and with the verification (and the verification alone); medians of
--repeats interleaved rounds, the order of the two saves and of the two loads swapped every round
(the first round also warms the page cache). Then the cost per WARP iteration of --runs M runs, which
seals M + 2 checkpoints (the runs, SLERP, LITI) and verifies M + 1 as it reads them (the runs, for
the merge; θ_init), as a share of its M x --steps RL steps of --step_s seconds each: by default the
124M step bench/rl_step.py measured (7.15 s, 2 CPU cores, 2026-11-30; the README's table).

    python bench/checksums.py                  # GPT-2 124M, 5 rounds
    python bench/checksums.py --layers 2 --width 64 --vocab 1000 --repeats 1   # a quick look
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from nanowarp import checksums, hub  # noqa: E402
from nanowarp.models.gpt2 import GPT2, GPT2Config  # noqa: E402


def save_without_checksums(folder, config, state_dict):
    """hub.save_checkpoint as it was before checksums.sha256: the weights, then config.json."""
    state_dict = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    hub.write_bytes(os.path.join(folder, "model.safetensors"), hub.save(state_dict, metadata={"format": "pt"}))
    hub.write_json(os.path.join(folder, "config.json"), config, sort_keys=True)


def timed(fn, *args):
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=100, help="RL steps of a run, for the overhead")
    p.add_argument("--step_s", type=float, default=7.15, help="seconds per RL step, for the overhead")
    p.add_argument("--runs", type=int, default=2, help="M, RL runs per WARP iteration, for the overhead")
    p.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary folder)")
    return p.parse_args(argv)


def main():
    args = parse_args()

    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=args.vocab, n_layer=args.layers, n_embd=args.width,
                            n_head=max(1, args.width // 64)))
    config, theta = model.config.to_hf(), model.hf_state_dict()
    n = sum(v.numel() for v in theta.values())
    root = tempfile.mkdtemp(dir=args.dir, prefix="bench-checksums-")
    plain, sealed = os.path.join(root, "plain"), os.path.join(root, "sealed")
    times = {k: [] for k in ("save", "save + checksums", "checksums", "load", "load + verify", "verify")}
    try:
        for r in range(args.repeats):  # interleaved: drift on a shared machine hits every contender alike
            saves = [("save", save_without_checksums, plain), ("save + checksums", hub.save_checkpoint, sealed)]
            loads = [("load", plain), ("load + verify", sealed)]  # without checksums.sha256: not verified
            for name, save, folder in saves[::-1] if r % 2 else saves:
                times[name].append(timed(save, folder, config, theta))
            times["checksums"].append(timed(hub.seal, sealed))  # what save_checkpoint adds, alone
            for name, folder in loads[::-1] if r % 2 else loads:
                times[name].append(timed(GPT2.from_pretrained, folder))
            times["verify"].append(timed(checksums.problem, sealed))
        size = os.path.getsize(os.path.join(sealed, "model.safetensors"))
        assert checksums.problem(sealed) is None
    finally:
        shutil.rmtree(root)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"GPT-2 {n / 1e6:.0f}M parameters, model.safetensors {hub.format_size(size)}, medians of {args.repeats} "
          f"rounds, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'':18s}{'seconds':>9s}{'vs without':>12s}")
    for without, with_ in (("save", "save + checksums"), ("load", "load + verify")):
        print(f"{without:18s}{med[without]:9.3f}{'':>12s}")
        print(f"{with_:18s}{med[with_]:9.3f}{med[with_] / med[without]:11.2f}x")
    print(f"{'checksums alone':18s}{med['checksums']:9.3f}   ({size / med['checksums'] / 1e9:.2f} GB/s, hub.seal)")
    print(f"{'verify alone':18s}{med['verify']:9.3f}   ({size / med['verify'] / 1e9:.2f} GB/s)")
    m = args.runs  # an iteration seals its M runs, SLERP and LITI, and reads the runs and θ_init back
    extra, train = (m + 2) * med["checksums"] + (m + 1) * med["verify"], m * args.steps * args.step_s
    print(f"per WARP iteration of {m} runs ({m + 2} checkpoints sealed, {m + 1} verified): {extra:.2f} s = "
          f"{100 * extra / train:.2f}% of {m} x {args.steps} steps x {args.step_s:g} s ({train:.0f} s)")


if __name__ == "__main__":
    main()
