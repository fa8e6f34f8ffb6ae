"""
One command that checks nanowarp on the device its users train on and prints one table:

    python bench/device_check.py                  # a GPU: GPT-2 124M shapes, fp32 and bf16 (a few minutes)
    python bench/device_check.py --small          # a CPU: small shapes, the same table (seconds)
    python bench/device_check.py --cpu-memory     # peak memory of one RL step on the CPU, GPT-2 124M
                                                  # shapes, whole batch vs --micro-batch-size 8

On a GPU it then runs the scale bench (bench/scale.py: loading, and one RL step's memory in float32,
bf16 and bf16 with gradient checkpointing) at Llama-3.2-1B's shape (--scale picks the shapes).

Random weights of the real shapes (GPT-2 124M policy, DistilBERT-base reward model, tokenizers
with one word per token id), nothing downloaded. For each dtype (float32, bfloat16):

1. parity: the next-token log-probs of a forward pass on the device against float32 on the CPU;
2. sampling tokens/s at batch 64 x 128 new tokens: nanowarp eager, nanowarp compiled
   (`sample(compile=True)`, its compilation timed apart) and transformers' `generate` (when installed);
3. the fused log-prob (nanowarp/logprobs.py) against naive log_softmax + gather, forward and
   backward to the hidden states at 64 x 148 tokens: time and, on a GPU, extra peak memory;
4. seconds per RL step of the default WARP configuration (batch 64, 128 new tokens, LoRA 32),
   REINFORCE and RLOO k = 4, split into sampling, scoring and update, with the peak GPU memory,
   and the projected time of the default job (I = 2, M = 2, T = 100: 400 steps, one after the other).

Random weights never emit EOS, so every completion has all its new tokens: the longest step.
The RL step's split is taken as train.py logs it (time_sample, time_score, time_update); its total
is measured between steps, after a device sync.

--cpu-memory runs one RL step per setting, each in a fresh process, and reports the peak resident
memory above what the process held before the step (models, data), as bench/logprobs.py does.
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fresh_process  # noqa: E402
from nanowarp.config import Config, flag, parse_args as parse_flags  # noqa: E402
from nanowarp.fast.logprobs import fused_token_logprobs  # noqa: E402
from nanowarp.models import from_config  # noqa: E402
from nanowarp.models.distilbert import DistilBertClassifier, DistilBertConfig  # noqa: E402
from nanowarp.models.gpt2 import GPT2, GPT2Config  # noqa: E402
from nanowarp.models.llama_config import LlamaConfig  # noqa: E402
from nanowarp.reward import Reward, RewardModel  # noqa: E402
from nanowarp.rl import Resources, rl_run  # noqa: E402
from nanowarp.sampling import sample  # noqa: E402

# the real setting, and small shapes a CPU runs in seconds
FULL = dict(gpt2=dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
            distilbert=dict(vocab_size=28996, dim=768, n_layers=6, n_heads=12, hidden_dim=3072),
            batch=64, new_tokens=128, lora_rank=32, logprob_tokens=148)
SMALL = dict(gpt2=dict(vocab_size=1000, n_positions=128, n_embd=64, n_layer=2, n_head=4),
             distilbert=dict(vocab_size=600, dim=32, n_layers=2, n_heads=4, hidden_dim=64),
             batch=8, new_tokens=16, lora_rank=4, logprob_tokens=24)
JOB = dict(iterations=2, runs=2, steps=100)  # the default job whose time is projected


@dataclass
class Args:
    small: bool = flag(False, "small shapes (2 layers, width 64, batch 8 x 16 new tokens), for a CPU")
    device: str = flag("auto", "cpu, cuda, cuda:N, or auto")
    dtypes: str = flag("float32,bfloat16", "comma-separated dtypes to check")
    compile: bool = flag(True, "also time sample(compile=True) (compiling takes a minute or more on a CPU)")
    hf: bool = flag(True, "also time transformers' generate (skipped when transformers is missing)")
    rl_steps: int = flag(3, "RL steps per configuration: the first is a warm-up, the others are averaged")
    threads: int = flag(0, "torch.set_num_threads; 0 keeps torch's default")
    cpu_memory: bool = flag(False, "instead of the table: peak memory of one RL step on the CPU, whole batch vs "
                                   "--micro-batch-size, each in a fresh process")
    micro_batch_size: int = flag(8, "--cpu-memory: the micro-batch size compared with the whole batch")
    rloo_k: int = flag(1, "--cpu-memory: completions per prompt of the measured step")
    memory_worker: int = flag(-1, "internal (--cpu-memory): measure one step with this micro-batch size, print JSON")
    scale: str = flag("llama-3.2-1b", "on a GPU, then run bench/scale.py at these shapes (comma-separated, e.g. "
                                      "llama-3.2-1b,mistral-7b), its RL step on the GPU; none: skip")


def parse_args(argv=None):
    return parse_flags(argv, Args, presets=None, description=__doc__, dashes=True)


# ---- random models of the real shapes -------------------------------------------------------------

def word_tokenizer(n):
    """A tokenizer whose token i is the word t{i}: decoding n ids gives n words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(n)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def random_resources(shape, device, dtype, folder, seed=0):
    """(θ_init, Resources) for rl_run: a random GPT-2 (or, with shape["llama"], a random Llama of
    that config.json) and a random DistilBERT classifier, saved in `folder` (the reward model loads
    from a folder), whose WordPiece vocabulary holds t0, t1, ...: each sampled token is one word,
    one reward-model token."""
    torch.manual_seed(seed)
    arch = shape.get("llama") or shape["gpt2"]
    ids = dict(bos_token_id=arch["vocab_size"] - 1, eos_token_id=arch["vocab_size"] - 1)
    config = LlamaConfig.from_hf({**arch, **ids}) if "llama" in shape else GPT2Config(**arch, **ids)
    theta = from_config(config).hf_state_dict()
    return theta, resources_for(config, shape["distilbert"], device, dtype, folder, seed)


def resources_for(config, distilbert, device, dtype, folder, seed=0):
    """Resources for rl_run with a policy of this config: a random DistilBERT classifier of the
    shape `distilbert` saved in `folder` (the reward model loads from a folder), whose WordPiece
    vocabulary holds t0, t1, ... (each sampled token is one word, one reward-model token), and 256
    random prompts of 5 to 20 tokens, as IMDB's."""
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = special + [f"t{i}" for i in range(distilbert["vocab_size"] - len(special))]
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("".join(v + "\n" for v in vocab))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"do_lower_case": False}, f)
    DistilBertClassifier(DistilBertConfig(**distilbert, pad_token_id=0,
                                          id2label={0: "NEGATIVE", 1: "POSITIVE"})).save_pretrained(folder)
    reward = Reward([RewardModel(folder, device, dtype=dtype)])
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, config.vocab_size - 1, (int(n),), generator=g).tolist()
               for n in torch.randint(5, 21, (256,), generator=g)]  # IMDB's prompts: 5 to 20 tokens
    return Resources(config, word_tokenizer(config.vocab_size), reward, prompts, config.eos_token_id, device)


def rl_config(shape, dtype, rloo_k, steps, micro_batch_size=0):
    """The default WARP configuration at these shapes."""
    return Config(batch_size=shape["batch"], max_new_tokens=shape["new_tokens"], lora_rank=shape["lora_rank"],
                  lora_alpha=float(shape["lora_rank"]), rloo_k=rloo_k, steps=steps, dtype=str(dtype).split(".")[-1],
                  micro_batch_size=micro_batch_size)


# ---- timing helpers ------------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def peak_mib(device, fn):
    """(seconds, extra peak MiB above what was allocated before) of fn; the memory on a GPU only."""
    if device.type != "cuda":
        return timed(fn, device)[0], None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    seconds, _ = timed(fn, device)
    return seconds, (torch.cuda.max_memory_allocated(device) - before) / 2**20


# ---- the checks -------------------------------------------------------------------------------------

def check_parity(cpu_model, device, dtype):
    """Max |Δ| of next-token log-probs (fused log-prob, float32 arithmetic) against float32 on the CPU."""
    idx = torch.randint(0, cpu_model.config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = fused_token_logprobs(cpu_model.hidden_states(idx[:, :-1]), cpu_model.lm_head.weight, idx[:, 1:])
        model = GPT2(cpu_model.config)
        model.load_state_dict(cpu_model.state_dict())
        model = model.to(device, dtype).eval()
        x = idx.to(device)
        got = fused_token_logprobs(model.hidden_states(x[:, :-1]), model.lm_head.weight, x[:, 1:])
    return (got.cpu() - ref).abs().max().item()


def check_sampling(cpu_model, device, dtype, shape, args):
    """tokens/s of each sampler at batch x new tokens, prompts of 16 tokens, no early stop."""
    B, N = shape["batch"], shape["new_tokens"]
    model = GPT2(cpu_model.config)
    model.load_state_dict(cpu_model.state_dict())
    model = model.to(device, dtype).eval()
    prompts = torch.randint(0, model.config.vocab_size, (B, 16), generator=torch.Generator().manual_seed(2))
    rates, notes = {}, {}

    def nanowarp(compile):
        g = torch.Generator(device).manual_seed(0)
        return lambda: sample(model, prompts.tolist(), N, generator=g, compile=compile)

    timed(nanowarp(False), device)  # warm-up
    rates["nanowarp eager"] = B * N / statistics.median(timed(nanowarp(False), device)[0] for _ in range(2))
    if args.compile:
        notes["nanowarp compiled"] = f"compiled in {timed(nanowarp(True), device)[0]:.0f} s"
        rates["nanowarp compiled"] = B * N / statistics.median(timed(nanowarp(True), device)[0] for _ in range(2))
    if args.hf:
        try:
            from transformers import GPT2Config as HFConfig, GPT2LMHeadModel
        except ImportError:
            notes["generate"] = "transformers not installed"
        else:
            hf = GPT2LMHeadModel(HFConfig(**{k: v for k, v in model.config.to_hf().items() if k != "architectures"}))
            hf.load_state_dict(cpu_model.hf_state_dict(), strict=False)  # lm_head is tied
            hf = hf.to(device, dtype).eval()
            hf.generation_config.eos_token_id = None  # no early stop
            hf.generation_config.pad_token_id = model.config.eos_token_id
            idx = prompts.to(device)
            run = lambda: hf.generate(idx, attention_mask=torch.ones_like(idx), do_sample=True, top_k=0,  # noqa: E731
                                      max_new_tokens=N)
            timed(run, device)  # warm-up
            rates["generate"] = B * N / statistics.median(timed(run, device)[0] for _ in range(2))
    return rates, notes


def check_logprobs(shape, device, dtype):
    """(seconds, extra peak MiB) of naive and fused log-probs, forward + backward to the hidden states."""
    B, T, (V, d) = shape["batch"], shape["logprob_tokens"], (shape["gpt2"]["vocab_size"], shape["gpt2"]["n_embd"])
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(B, T, d, generator=g).to(device, dtype).requires_grad_()
    weight = (0.02 * torch.randn(V, d, generator=g)).to(device, dtype)
    targets = torch.randint(0, V, (B, T), generator=g).to(device)
    upstream = torch.randn(B, T, generator=g).to(device)

    def naive():
        lp = torch.log_softmax((hidden @ weight.T).float(), -1).gather(-1, targets[..., None]).squeeze(-1)
        (lp * upstream).sum().backward()

    def fused():
        (fused_token_logprobs(hidden, weight, targets) * upstream).sum().backward()

    out = {}
    for name, fn in (("naive", naive), ("fused", fused)):
        fn()  # warm-up
        hidden.grad = None
        out[name] = peak_mib(device, fn)
        hidden.grad = None
    return out


def check_rl_step(shape, device, dtype, rloo_k, steps, folder):
    """Mean seconds of an RL step (after the first) and its split, peak GPU memory (MiB) of the run."""
    theta, res = random_resources(shape, device, dtype, folder)
    cfg = rl_config(shape, dtype, rloo_k, steps)
    rows, stamps = [], []

    def log(row):
        sync(device)
        rows.append(row)
        stamps.append(time.perf_counter())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    rl_run(theta, 0, 0, cfg, res, log)
    totals = [b - a for a, b in zip([t0] + stamps, stamps)][1:]  # the first step warms up
    split = {k: statistics.mean(r[k] for r in rows[1:]) for k in ("time_sample", "time_score", "time_update")}
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return statistics.mean(totals), split, peak


# ---- the CPU memory of an RL step --------------------------------------------------------------------

def memory_worker(args, shape):
    """One RL step on the CPU with --memory-worker as micro-batch size: prints its extra peak RSS."""
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as folder:
        theta, res = random_resources(shape, device, torch.float32, folder)
        cfg = rl_config(shape, torch.float32, args.rloo_k, 1, args.memory_worker)
        before = fresh_process.status_mib("VmRSS")
        fresh_process.reset_peak()
        high_water = fresh_process.status_mib("VmHWM")
        t0 = time.perf_counter()
        rl_run(theta, 0, 0, cfg, res)
        peak = fresh_process.status_mib("VmHWM")
    print(json.dumps({"micro_batch_size": args.memory_worker, "resident_before_mib": before,
                      "high_water_before_mib": high_water, "peak_mib": peak, "extra_peak_mib": peak - before,
                      "seconds": time.perf_counter() - t0}))


def cpu_memory(args, shape):
    print(f"{time.strftime('%Y-%m-%d')}  one RL step on the CPU: batch {shape['batch']}, {shape['new_tokens']} new "
          f"tokens, LoRA {shape['lora_rank']}, rloo_k {args.rloo_k}, float32, GPT-2 {'small' if args.small else '124M'} "
          f"shapes; each setting in a fresh process")
    results = []
    for micro in (0, args.micro_batch_size):
        flags = ["--memory-worker", micro, "--rloo-k", args.rloo_k] + (["--small"] if args.small else [])
        results.append(fresh_process.run_worker(__file__, flags + (["--threads", args.threads] if args.threads else [])))
    print(f"\n{'micro-batch size':>16s} {'resident before (MiB)':>22s} {'peak (MiB)':>11s} {'step extra peak (MiB)':>22s}")
    for r in results:
        print(f"{r['micro_batch_size'] or 'whole batch':>16} {r['resident_before_mib']:22.0f} {r['peak_mib']:11.0f} "
              f"{r['extra_peak_mib']:22.0f}")
    whole, micro = results
    print(f"\nmicro-batches of {args.micro_batch_size}: {fresh_process.ratio(micro['peak_mib'], whole['peak_mib'])} the "
          f"whole batch's peak, {fresh_process.ratio(micro['extra_peak_mib'], whole['extra_peak_mib'])} its step's extra peak")


# ---- main ------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = SMALL if args.small else FULL
    if args.memory_worker >= 0:
        return memory_worker(args, shape)
    if args.cpu_memory:
        return cpu_memory(args, shape)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"{time.strftime('%Y-%m-%d')}  {device}: {name}, torch {torch.__version__}, "
          f"{'small' if args.small else 'GPT-2 124M'} shapes, random weights")
    torch.manual_seed(0)
    cpu_model = GPT2(GPT2Config(**shape["gpt2"])).eval()
    B, N = shape["batch"], shape["new_tokens"]
    lines = []

    def row(section, what, value, note=""):
        lines.append((section, what, value, note))
        print(f"  {section:10s} {what:44s} {value:>12s}  {note}", flush=True)

    for dtype in [getattr(torch, d) for d in args.dtypes.split(",")]:
        dt = str(dtype).split(".")[-1]
        row("parity", f"{dt}: max |Δ log-prob| vs CPU float32", f"{check_parity(cpu_model, device, dtype):.2e}")
        rates, notes = check_sampling(cpu_model, device, dtype, shape, args)
        for who, tps in rates.items():
            ratio = f"{tps / rates['generate']:.2f}x generate" if "generate" in rates else ""
            row("sampling", f"{dt}: {who}, {B} x {N}", f"{tps:.0f} tok/s", f"{ratio} {notes.get(who, '')}".strip())
        for who, note in notes.items():
            if who not in rates:
                row("sampling", f"{dt}: {who}", "-", note)
        lp = check_logprobs(shape, device, dtype)
        for who, (seconds, mib) in lp.items():
            mem = f"extra peak {mib:.0f} MiB" if mib is not None else "memory: bench/logprobs.py on a CPU"
            row("log-prob", f"{dt}: {who}, {B} x {shape['logprob_tokens']}, fwd+bwd", f"{seconds * 1e3:.1f} ms",
                f"{seconds / lp['naive'][0]:.2f}x naive, {mem}")
        for k, method in ((1, "REINFORCE"), (4, "RLOO k=4")):
            with tempfile.TemporaryDirectory() as folder:
                step, split, peak = check_rl_step(shape, device, dtype, k, args.rl_steps, folder)
            job = step * JOB["iterations"] * JOB["runs"] * JOB["steps"]
            parts = ", ".join(f"{key.removeprefix('time_')} {v:.2f}" for key, v in split.items())
            row("RL step", f"{dt}: {method}, batch {B}, {N} new, LoRA {shape['lora_rank']}", f"{step:.2f} s",
                f"{parts}" + (f"; peak GPU memory {peak:.0f} MiB" if peak is not None else ""))
            row("job", f"{dt}: {method}, I=2 M=2 T=100 projected", f"{job / 60:.1f} min",
                "400 steps one after the other")

    print(f"\n{'check':10s} {'what':44s} {'value':>12s}  note")
    for section, what, value, note in lines:
        print(f"{section:10s} {what:44s} {value:>12s}  {note}")
    if device.type == "cuda" and args.scale != "none":  # loading and an RL step's memory at 1B (7B) shapes
        sys.stdout.flush()
        subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "scale.py"),
                        "--device", str(device), "--shapes", args.scale], check=True)


if __name__ == "__main__":
    main()
