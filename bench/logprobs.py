"""
Log-probs of given tokens, forward + backward: nanowarp's `fused_token_logprobs` vs the naive
`log_softmax(hidden @ weightᵀ).gather(targets)`. Extra peak memory and time.

Shapes of a WARP batch: B = 64 completions of T = 148 tokens, GPT-2's V = 50257 and d = 768,
fp32, temperature 1. Two cases:
- hidden:        gradient to `hidden` only. WARP with LoRA: the tied LM head is frozen.
- hidden+weight: gradients to `hidden` and to the LM head weight (full fine-tuning).

Each measurement runs in a fresh Python process (this script with --worker), so that no variant
inherits another's allocator state or high-water mark. The worker warms up on a tiny problem,
allocates the inputs (hidden, weight, targets, upstream gradient), reads the process's peak
resident set size (getrusage's ru_maxrss, in KiB on Linux), runs forward + backward once, timed,
and reads the peak again: "extra peak" is the difference, the most memory the computation had
resident at any moment beyond its inputs, gradients included (both variants produce the same
gradients: hidden's 29 MB, and with the weight the weight's 154 MB). RSS counts pages actually
touched, which is what would run a machine out of memory.

Variants and cases alternate in every repeat; the table shows medians over repeats.

    python bench/logprobs.py                      # both cases, 2 repeats: ~6 minutes on 2 cores
    python bench/logprobs.py --cases hidden --repeats 3 --chunk-size 1024
"""

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, fields

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fresh_process  # noqa: E402
from nanowarp.config import flag, parse_args as parse_flags  # noqa: E402
from nanowarp.fast.logprobs import fused_token_logprobs  # noqa: E402


@dataclass
class Args:
    batch: int = flag(64, "B")
    seq: int = flag(148, "T")
    vocab: int = flag(50257, "V")
    dim: int = flag(768, "d")
    chunk_size: int = flag(0, "tokens per chunk, fused; 0: its default")
    cases: str = flag("hidden,hidden+weight", "comma-separated: hidden (LM head frozen), hidden+weight")
    repeats: int = flag(2, "fresh processes per variant and case; medians are reported")
    threads: int = flag(0, "torch.set_num_threads in the workers; 0 keeps torch's default")
    worker: str = flag("", argparse.SUPPRESS)  # internal: run one variant (fused or naive) here, print JSON
    case: str = flag("hidden", argparse.SUPPRESS)  # internal: the worker's case


def parse_args(argv=None):
    return parse_flags(argv, Args, presets=None, description=__doc__, dashes=True)


def naive(hidden, weight, targets):
    logits = hidden @ weight.T  # (B, T, V)
    return torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)


def fused(chunk_size):
    return lambda hidden, weight, targets: fused_token_logprobs(hidden, weight, targets, chunk_size=chunk_size or None)


def cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def worker(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    fn = naive if args.worker == "naive" else fused(args.chunk_size)
    grad_weight = args.case == "hidden+weight"

    def inputs(B, T, V, d):
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(B, T, d, generator=g).requires_grad_()
        weight = torch.randn(V, d, generator=g).mul_(0.02).requires_grad_(grad_weight)  # in place: no
        # temporary copy that would raise the high-water mark above what stays resident
        targets = torch.randint(0, V, (B, T), generator=g)
        upstream = torch.randn(B, T, generator=g)
        return hidden, weight, targets, upstream

    def step(hidden, weight, targets, upstream):
        (fn(hidden, weight, targets) * upstream).sum().backward()

    step(*inputs(2, 8, 1000, args.dim))  # warm-up: thread pools, kernels
    x = inputs(args.batch, args.seq, args.vocab, args.dim)
    before = fresh_process.status_mib("VmRSS")
    fresh_process.reset_peak()
    # the extra peak is only seen if the run goes above the high-water mark so far: that mark (warm-up,
    # input creation) must be within a few MiB of what is resident now
    high_water = fresh_process.status_mib("VmHWM")
    assert high_water - before < 16, f"high-water mark {high_water:.0f} MiB above the resident {before:.0f} MiB"
    t0, c0 = time.perf_counter(), cpu_seconds()
    step(*x)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "extra_peak_mib": fresh_process.status_mib("VmHWM") - before,
                      "baseline_mib": before}))


def main():
    args = parse_args()
    if args.worker:
        return worker(args)
    print(f"{time.strftime('%Y-%m-%d')}  {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} with {args.threads or torch.get_num_threads()} threads; "
          f"B={args.batch} T={args.seq} V={args.vocab} d={args.dim} fp32, forward + backward")
    cases, variants = args.cases.split(","), ["naive", "fused"]
    results = {(c, v): [] for c in cases for v in variants}
    for r in range(args.repeats):
        for case in cases:
            for variant in variants[r % 2:] + variants[:r % 2]:  # alternate which goes first
                flags = ["--worker", variant, "--case", case]
                for f in fields(Args):
                    if f.name not in ("worker", "case", "cases", "repeats"):
                        flags += [f"--{f.name.replace('_', '-')}", getattr(args, f.name)]
                res = fresh_process.run_worker(__file__, flags)
                results[case, variant].append(res)
                print(f"  repeat {r}  {case:14s} {variant:6s} {res['seconds']:7.2f} s  cpu {res['cpu_seconds']:7.2f} s  "
                      f"extra peak {res['extra_peak_mib']:8.1f} MiB  (inputs {res['baseline_mib']:.0f} MiB)", flush=True)

    print(f"\n{'case':14s} {'variant':8s} {'time (s)':>9s} {'extra peak (MiB)':>17s} {'time vs naive':>14s} "
          f"{'memory vs naive':>16s}")
    for case in cases:
        med = {v: (statistics.median(x["seconds"] for x in results[case, v]),
                   statistics.median(x["extra_peak_mib"] for x in results[case, v])) for v in variants}
        for v in variants:
            t, m = med[v]
            share = f"{100 * m / med['naive'][1]:.1f}%" if med["naive"][1] > 0 else "n/a"  # as fresh_process.ratio
            print(f"{case:14s} {v:8s} {t:9.2f} {m:17.1f} {t / med['naive'][0]:13.2f}x {share:>16s}")


if __name__ == "__main__":
    main()
