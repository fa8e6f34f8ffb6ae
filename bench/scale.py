"""
The scale bench: loading a checkpoint, and the memory of one RL step, at the shapes of real models,
with random weights written by nanowarp (nothing is downloaded):

    python bench/scale.py                                   # Qwen2.5-0.5B's and Llama-3.2-1B's shapes
    python bench/scale.py --shapes llama-3.2-1b --layers 8  # fewer layers: a smaller file, the same widths
    python bench/scale.py --device cuda --shapes llama-3.2-1b,mistral-7b   # the RL step on a GPU
    python bench/scale.py --tiny                            # a tiny shape, in seconds (the test suite's smoke test)

For each shape it writes a random float32 checkpoint (nanowarp's models.from_config, then
save_pretrained), then measures, each in a fresh process (a process's high-water mark only grows):

1. loading the file on the CPU: a copying load (safetensors' load_file, which maps the file and
   returns at once, then every tensor cloned: like with like), nanowarp's models.from_pretrained,
   and from_pretrained(dtype=torch.bfloat16); and, to show what the verification costs, the SHA-256
   of the files alone (hub.verify) and from_pretrained of the same files in a folder without
   checksums.sha256 (as a Hub download): seconds, and the peak resident set (VmHWM, which
   counts the mapped pages of the file that ru_maxrss may miss) above the resident set before
   loading, against the file's bytes. Targets: ≤ 1.2x the file (≤ 1.0x as bf16), time ≤ 1.5x the
   copying load's.
2. one RL step (rl_run, --batch completions of --new-tokens tokens, LoRA on every block linear, a
   small random DistilBERT reward model) in float32, bfloat16, and bfloat16 with
   --gradient_checkpointing: the peak memory of the run, torch.cuda.max_memory_allocated on a GPU,
   on the CPU the peak resident set above the resident set before it (θ_init is loaded by then).
   Target: the bf16 step's peak ≤ 0.6x the float32 step's. On a CPU, float32 policies take θ_init's
   own tensors (nanowarp.rl.build_policy), so the float32 step's extra memory there is small.
   docs/precision.md#memory-of-a-warp-run counts the bytes per weight.

The file goes to --folder (default: a temporary folder, removed at the end); the page cache is
warmed by reading it once, so that every loader reads from memory.
"""

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fresh_process  # noqa: E402
from nanowarp import checksums, hub, models  # noqa: E402
from nanowarp.config import Config, flag, parse_args as parse_flags  # noqa: E402
from nanowarp.models.llama_config import LlamaConfig  # noqa: E402

# the numbers of each model's config.json on the Hugging Face Hub (copied here, nothing is downloaded)
SHAPES = {
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=True),
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, rope_scaling=dict(
                             rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=8192)),
    "mistral-7b": dict(model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-5,
                       tie_word_embeddings=False),
    "tiny": dict(model_type="llama", vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True),
}
REWARD = dict(vocab_size=1000, dim=64, n_layers=2, n_heads=4, hidden_dim=128)  # a small random DistilBERT
LOADERS = ("copying load", "from_pretrained", "from_pretrained bf16", "checksums alone", "unverified")
STEPS = ("float32", "bfloat16", "bfloat16 + checkpointing")
TARGETS = {"from_pretrained": 1.2, "from_pretrained bf16": 1.0}  # peak resident set / the file's bytes


@dataclass
class Args:
    shapes: str = flag("qwen2.5-0.5b,llama-3.2-1b", f"comma-separated shapes: {', '.join(SHAPES)}")
    layers: int = flag(0, "keep this many layers of each shape (0: all): a smaller file, the same widths")
    tiny: bool = flag(False, "the tiny shape only, a batch of 4 x 8 new tokens: seconds (the smoke test)")
    device: str = flag("cpu", "where the RL step runs: cpu, cuda, cuda:N (loading is always on the CPU)")
    batch: int = flag(8, "completions of the RL step")
    new_tokens: int = flag(32, "new tokens per completion")
    lora_rank: int = flag(16, "LoRA rank on every block linear")
    steps: str = flag(",".join(STEPS), "the RL steps to measure, comma-separated (none: loading only)")
    folder: str = flag(None, "where the random checkpoint is written and kept (default: a temporary folder)")
    threads: int = flag(0, "torch.set_num_threads in every process; 0 keeps torch's default")
    worker: str = flag(None, "internal: measure one loader or step on --folder in this process, print JSON")


def parse_args(argv=None):
    return parse_flags(argv, Args, presets=None, description=__doc__, dashes=True)


# ---- memory as Linux reports it ----------------------------------------------------------------

def checkpoint_bytes(folder):
    return sum(os.path.getsize(os.path.join(folder, f)) for f in hub.weight_files(folder))


# ---- the workers: one measurement each, in a fresh process -------------------------------------

def copying_load(folder):
    """safetensors' load_file of each weight file (it maps the file), then every tensor cloned."""
    from safetensors.torch import load_file
    state_dict = {}
    for name in hub.weight_files(folder):
        if name.endswith(".safetensors"):
            state_dict.update({k: v.clone() for k, v in load_file(os.path.join(folder, name)).items()})
    return state_dict


def load_worker(args):
    loader = {"copying load": copying_load, "from_pretrained": models.from_pretrained, "unverified": models.from_pretrained,
              "from_pretrained bf16": lambda folder: models.from_pretrained(folder, torch.bfloat16),
              "checksums alone": lambda folder: {"problem": hub.verify(folder)}}[args.worker]
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(args.folder))) as bare:
        folder = args.folder
        if args.worker == "unverified":  # the same files (hard links) without checksums.sha256
            for name in os.listdir(folder):
                if name != checksums.NAME:
                    os.link(os.path.join(folder, name), os.path.join(bare, name))
            folder = bare
        before = fresh_process.status_mib("VmRSS")
        fresh_process.reset_peak()
        t0 = time.perf_counter()
        loaded = loader(folder)
        seconds = time.perf_counter() - t0
    return dict(seconds=seconds, before_mib=before, peak_mib=fresh_process.status_mib("VmHWM"), kept=len(loaded.state_dict())
                if hasattr(loaded, "state_dict") else len(loaded))


def step_worker(args):
    from device_check import resources_for
    from nanowarp.rl import rl_run
    device = torch.device(args.device)
    dtype = torch.float32 if args.worker == "float32" else torch.bfloat16
    config = models.load_config(args.folder)
    theta = models.load_theta(args.folder)
    cfg = Config(batch_size=args.batch, max_new_tokens=args.new_tokens, lora_rank=args.lora_rank,
                 lora_alpha=float(args.lora_rank), steps=1, dtype=str(dtype).split(".")[-1],
                 gradient_checkpointing=args.worker.endswith("checkpointing"))
    with tempfile.TemporaryDirectory() as reward_folder:
        resources = resources_for(config, REWARD, device, dtype, reward_folder)
        before = fresh_process.status_mib("VmRSS")
        fresh_process.reset_peak()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        rl_run(theta, 0, 0, cfg, resources)
        seconds = time.perf_counter() - t0
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return dict(seconds=seconds, before_mib=before, peak_mib=fresh_process.status_mib("VmHWM"), gpu_peak_mib=gpu)


def measure(args, what):
    """Run one worker in a fresh process; its JSON."""
    return fresh_process.run_worker(__file__, ["--worker", what, "--folder", args.folder, "--device", args.device,
                                               "--batch", args.batch, "--new-tokens", args.new_tokens,
                                               "--lora-rank", args.lora_rank, "--threads", args.threads])


# ---- main -------------------------------------------------------------------------------------

def write_checkpoint(shape, layers, folder):
    """A random float32 checkpoint of this shape (its first `layers` layers), as nanowarp saves one."""
    d = {**SHAPES[shape], "bos_token_id": 0, "eos_token_id": 1}
    if layers:
        d["num_hidden_layers"] = min(layers, d["num_hidden_layers"])
    torch.manual_seed(0)
    model = models.from_config(LlamaConfig.from_hf(d))
    model.save_pretrained(folder)
    n = sum(p.numel() for p in model.parameters())
    del model
    with open(os.path.join(folder, "model.safetensors"), "rb") as f:  # warm the page cache: every loader reads memory
        while f.read(1 << 26):
            pass
    return d["num_hidden_layers"], n


def bench_shape(args, shape):
    layers, n = write_checkpoint(shape, args.layers, args.folder)
    size = checkpoint_bytes(args.folder)
    print(f"\n{shape}: {layers} layers, {n / 1e6:.0f}M weights, a float32 file of {size / 2**20:.0f} MiB", flush=True)
    loads = {what: measure(args, what) for what in LOADERS}
    base = loads["copying load"]["seconds"]
    print(f"{'load (CPU)':24s} {'seconds':>8s} {'vs copying':>10s} {'peak above before (MiB)':>23s} {'x file':>7s}  target")
    for what, r in loads.items():
        extra = r["peak_mib"] - r["before_mib"]
        target = f"≤ {TARGETS[what]:.1f}x file, ≤ 1.5x copying's time" if what in TARGETS else ""
        print(f"{what:24s} {r['seconds']:8.2f} {r['seconds'] / base:9.2f}x {extra:23.0f} {extra * 2**20 / size:6.2f}x  "
              f"{target}", flush=True)
    steps = [s for s in args.steps.split(",") if s and s != "none"]
    if not steps:
        return
    results = {what: measure(args, what) for what in steps}
    unit = "GPU peak (MiB)" if args.device.startswith("cuda") else "peak above before (MiB)"
    print(f"\n{'RL step (' + args.device + ')':24s} {'seconds':>8s} {unit:>23s} {'vs float32':>10s}")
    peaks = {what: r["gpu_peak_mib"] if r["gpu_peak_mib"] is not None else r["peak_mib"] - r["before_mib"]
             for what, r in results.items()}
    for what, r in results.items():
        ratio = f"{fresh_process.ratio(peaks[what], peaks['float32']):>10s}" if "float32" in peaks else ""
        target = "  target ≤ 0.60x" if what == "bfloat16" else ""
        print(f"{what:24s} {r['seconds']:8.2f} {peaks[what]:23.0f} {ratio}{target}", flush=True)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(load_worker(args) if args.worker in LOADERS else step_worker(args)))
        return
    if args.tiny:
        args.shapes, args.batch, args.new_tokens, args.lora_rank = "tiny", 4, 8, 4
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown --shapes {unknown[0]!r}: choose from {', '.join(SHAPES)}")
    device = args.device
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"
    print(f"{time.strftime('%Y-%m-%d')}  bench/scale.py {' '.join(sys.argv[1:])}: torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; RL step on {device} ({name}): batch {args.batch} x {args.new_tokens} "
          f"new tokens, LoRA {args.lora_rank} on every block linear")
    keep = args.folder
    for shape in args.shapes.split(","):
        args.folder = keep or tempfile.mkdtemp(prefix="scale-")
        try:
            bench_shape(args, shape)
        finally:
            if not keep:
                shutil.rmtree(args.folder, ignore_errors=True)


if __name__ == "__main__":
    main()
