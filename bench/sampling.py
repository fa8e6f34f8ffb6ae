"""
Sampling throughput: nanowarp's KV-cache sampler vs Hugging Face `generate` vs a loop without a
KV cache.

Random weights of the shape --model names, the same weights in every contender (checked: one
forward pass of each gives the same logits), fp32, prompts of 16 random tokens, plain sampling
(temperature 1, no top-k / top-p), no early stop: every row gets exactly `new` tokens.

- --model gpt2 (the default): GPT-2 124M; --model smollm2: a Llama of SmolLM2-135M's shape
  (hidden 576, 30 layers, 9 heads, 3 key/value heads, vocabulary 49,152; bench/policies.py says
  where the numbers come from). --layers N keeps the first N layers only, for a quick check.

- nanowarp:  nanowarp.sampling.sample(model, prompts, new, eos_token_id=None)
- generate:  transformers' GPT2LMHeadModel (LlamaForCausalLM for smollm2)
             .generate(do_sample=True, top_k=0), its eos disabled
- no cache:  each step runs the whole sequence through the model again, the LM head on the last
             position only, then nanowarp's sample_next: the KV cache is the only difference
             with nanowarp. It is slow, so it runs `--no-cache-repeats` times (default 1).

Contenders run one after the other inside each repeat, in a rotating order, so a slow spell of
a shared machine hits all of them; the table shows medians over repeats of tokens/s (B × new /
wall time of one call, prompt processing included) and the ratio of each median to generate's.

    python bench/sampling.py                      # both shapes, 3 repeats: ~5 minutes on 2 cores
    python bench/sampling.py --shapes 64x32 --repeats 5 --no-cache-repeats 0
    python bench/sampling.py --no-cache-repeats 0 --profile   # + where the time goes
    python bench/sampling.py --model smollm2 --shapes 64x32 --repeats 3 --no-cache-repeats 0

--profile times nanowarp's phases (prefill, transformer body, LM head, sampling), the matmuls of
a call on their own (a bound on the tokens/s of any fp32 sampler built on these kernels, and so
on its ratio to generate; nanowarp's median is printed as a fraction of it), and the top
operators of generate and nanowarp by torch.profiler.

--lora-ranks 8,32 adds nanowarp sampling from a LoRA policy of each rank (random factors on every
block linear), folded into W0 + s·B·A as an RL step samples it (nanowarp.lora.folded, the fold
timed with the call); --lora-unfolded adds the same policies unfolded (two extra matmuls per
linear and token). The "vs nanowarp" column compares each with the dense model.

    python bench/sampling.py --shapes 64x32,16x32 --no-cache-repeats 0 --lora-ranks 8,32 --lora-unfolded --profile
"""

import contextlib
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nanowarp.config import flag, parse_args as parse_flags  # noqa: E402
from nanowarp.lora import add_lora, folded, lora_modules  # noqa: E402
from nanowarp.models import from_config  # noqa: E402
from nanowarp.fast.matmul import linear  # noqa: E402
from nanowarp.padding import left_pad  # noqa: E402
from nanowarp.sampling import lm_head, sample, sample_next  # noqa: E402
from policies import MODELS, SMOKE, block_linears, hf_model, parity, policy_config, width  # noqa: E402


@dataclass
class Args:
    model: str = flag("gpt2", f"the policy's shape, random weights: {' or '.join(MODELS)} (GPT-2 124M, or a Llama "
                              "of SmolLM2-135M's shape)")
    layers: int = flag(0, "keep only the first N layers of --model (a quick check); 0 keeps them all")
    smoke: bool = flag(False, "a narrow model of --model's layout (width 32 or 48, vocabulary 500): a check that the "
                              "script runs, in seconds, not a measurement")
    shapes: str = flag("64x32,16x64", "comma-separated BATCHxNEW_TOKENS")
    prompt_len: int = flag(16, "tokens per prompt")
    repeats: int = flag(3, "timed calls per contender and shape; medians are reported")
    no_cache_repeats: int = flag(1, "timed calls of the slow no-cache loop; 0 skips it")
    hf: bool = flag(True, "include transformers' generate (skipped when transformers is missing)")
    compile: bool = flag(False, "also time nanowarp with compile=True")
    lora_ranks: str = flag("", "comma-separated LoRA ranks: also time sampling from a LoRA policy of each rank "
                               "(random factors), folded as an RL step samples it, e.g. 8,32")
    lora_unfolded: bool = flag(False, "with --lora-ranks: also time each LoRA policy unfolded (two extra "
                                      "matmuls per linear and token, as before folding)")
    profile: bool = flag(False, "also show where the time goes: nanowarp's phases, the matmuls alone, "
                                "generate's and nanowarp's top operators")
    threads: int = flag(0, "torch.set_num_threads; 0 keeps torch's default")
    seed: int = flag(0, "weights, prompts, sampling")


def parse_args(argv=None):
    return parse_flags(argv, Args, presets=None, description=__doc__, dashes=True)


@torch.no_grad()
def no_cache_generate(model, idx, new_tokens, generator):
    """What generation without a KV cache costs: the whole sequence again at every step."""
    for _ in range(new_tokens):
        logits = model.lm_head(model.hidden_states(idx)[:, -1])  # (B, V), prompts all of one length
        token, _ = sample_next(logits, generator=generator)
        idx = torch.cat([idx, token[:, None]], dim=1)
    return idx[:, -new_tokens:]


@torch.no_grad()
def breakdown(model, idx, new_tokens):
    """nanowarp's sampling of idx (B, P) cut into its parts, each timed on its own: the calls that
    sample() makes, with decode_one_token split into the transformer body and the LM head. Also
    the rate of each part in GFLOP/s, from the matmul FLOPs it must do (2 per weight per token)."""
    c = model.config
    body_flop = 2 * sum(lin.weight.numel() for lin in block_linears(model))  # per token: every block linear
    head_flop = 2 * width(c) * c.vocab_size
    (B, P), V = idx.shape, c.vocab_size
    prompt, prompt_mask = left_pad(idx.tolist(), 0)
    attention_mask = torch.cat([prompt_mask, prompt_mask.new_ones(B, new_tokens)], 1)
    logits_buffer, probs_buffer = torch.empty(V, B), torch.empty(B, V)
    g, t = torch.Generator().manual_seed(0), {"prefill": 0.0, "body": 0.0, "head": 0.0, "sample": 0.0}
    model.setup_caches(B, P + new_tokens)
    t0 = time.perf_counter()
    logits = lm_head(model, model.hidden_states(prompt, prompt_mask, torch.arange(P))[:, -1])
    t["prefill"] = time.perf_counter() - t0
    for i in range(new_tokens):
        t0 = time.perf_counter()
        token, _ = sample_next(logits, generator=g, probs_out=probs_buffer)
        t1 = time.perf_counter()
        t["sample"] += t1 - t0
        if i + 1 == new_tokens:
            break
        hidden = model.hidden_states(token[:, None], attention_mask[:, :P + i + 1], torch.tensor([P + i]))
        t2 = time.perf_counter()
        logits = lm_head(model, hidden[:, 0], logits_buffer)
        t["body"] += t2 - t1
        t["head"] += time.perf_counter() - t2
    model.clear_caches()
    steps, total = new_tokens - 1, sum(t.values())
    print(f"  nanowarp, {B}x{new_tokens}: {B * new_tokens / total:.1f} tokens/s, {total:.2f} s = "
          f"prefill {t['prefill']:.2f} s ({B * P * body_flop / t['prefill'] / 1e9:.0f} GFLOP/s) + "
          f"{steps} steps of [body {1e3 * t['body'] / steps:.1f} ms ({B * body_flop * steps / t['body'] / 1e9:.0f} GFLOP/s), "
          f"LM head {1e3 * t['head'] / steps:.1f} ms ({B * head_flop * steps / t['head'] / 1e9:.0f} GFLOP/s), "
          f"sampling {1e3 * t['sample'] / new_tokens:.1f} ms]")


@torch.no_grad()
def matmul_floor(model, B, P, new_tokens, repeats=5):
    """Seconds that the matmuls of one sample() call take on their own: every linear layer of the
    prefill (B·P rows) and of each decoding step (B rows), and the LM head of B rows, with the
    orientations sample() uses (fast.matmul.linear, sampling.lm_head), on the model's weights and random
    inputs; medians of `repeats`. No attention, norms, GELU, copies or sampling: a lower bound on
    the time of any sampler that does this arithmetic in fp32 with these kernels."""
    linears = block_linears(model)

    def timed(rows):
        xs = {k: torch.randn(rows, k) for k in {lin.in_features for lin in linears} | {width(model.config)}}
        out, runs = torch.empty(model.config.vocab_size, B), []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for lin in linears:
                linear(xs[lin.in_features], lin.weight, lin.bias)
            lm_head(model, xs[width(model.config)][:B], out)
            runs.append(time.perf_counter() - t0)
        return statistics.median(runs)

    prefill, step = timed(B * P), timed(B)
    total = prefill + (new_tokens - 1) * step
    print(f"  matmuls alone, {B}x{new_tokens}: prefill {prefill:.2f} s + {new_tokens - 1} steps of "
          f"{1e3 * step:.1f} ms = {total:.2f} s: at most {B * new_tokens / total:.1f} tokens/s")
    return B * new_tokens / total


def lora_sampler(model, rank, seed=0, fold=True):
    """sample() from a copy of model with LoRA of this rank on every block linear (random A and B,
    so the update is not zero), its factors folded as nanowarp.rl.rl_run folds them (fold)."""
    policy = from_config(model.config)
    policy.load_state_dict(model.state_dict())
    policy = add_lora(policy, rank).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(policy):
            m.lora_B.copy_(0.01 * torch.randn(m.lora_B.shape, generator=g))

    def run(idx, n, g):
        with folded(policy) if fold else contextlib.nullcontext():
            return sample(policy, idx.tolist(), n, generator=g).tokens
    return run


def profile_ops(fn, label, rows=12):
    """The operators that take the most time in one call of fn, by torch.profiler."""
    from torch.profiler import profile
    with profile() as prof:
        fn()
    print(f"  {label}: top operators by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def load_hf(model, seed):
    """transformers' model (GPT2LMHeadModel, LlamaForCausalLM) with nanowarp's weights, checked to
    give the same logits, or None without transformers."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("transformers is not installed: skipping generate")
        return None
    hf = hf_model(model.hf_state_dict(), model.config).eval()
    hf.generation_config.eos_token_id = None  # no early stop
    parity(hf, model, seed)
    return hf


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    layers = {"n_layer" if args.model == "gpt2" else "num_hidden_layers": args.layers} if args.layers else {}
    model = from_config(policy_config(args.model, **layers, **(SMOKE[args.model] if args.smoke else {}))).eval()
    hf = load_hf(model, args.seed) if args.hf else None
    print(f"{time.strftime('%Y-%m-%d')}  {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads, --model "
          f"{args.model}{f' ({args.layers} layers)' if args.layers else ''}{', --smoke' if args.smoke else ''}"
          + (f", transformers {sys.modules['transformers'].__version__}" if hf is not None else ""))

    contenders = {"nanowarp": lambda idx, n, g: sample(model, idx.tolist(), n, generator=g).tokens}
    for rank in [int(r) for r in args.lora_ranks.split(",") if r]:
        contenders[f"nanowarp LoRA {rank}"] = lora_sampler(model, rank)
        if args.lora_unfolded:
            contenders[f"LoRA {rank} unfolded"] = lora_sampler(model, rank, fold=False)
    if args.compile:
        contenders["nanowarp compile"] = lambda idx, n, g: sample(model, idx.tolist(), n, generator=g,
                                                                  compile=True).tokens
    if hf is not None:
        contenders["generate"] = lambda idx, n, g: hf.generate(
            idx, attention_mask=torch.ones_like(idx), do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
            max_new_tokens=n)[:, idx.size(1):]
    if args.no_cache_repeats > 0:
        contenders["no cache"] = lambda idx, n, g: no_cache_generate(model, idx, n, g)

    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    prompts = {(B, N): torch.randint(0, model.config.vocab_size, (B, args.prompt_len)) for B, N in shapes}
    # warm-up (thread pools, allocator, compilation) on a small batch
    for fn in contenders.values():
        fn(prompts[shapes[0]][:4], 2, torch.Generator().manual_seed(0))

    times = {(shape, name): [] for shape in shapes for name in contenders}
    names = list(contenders)
    for r in range(args.repeats):
        for shape in shapes:
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotating order
                if name == "no cache" and r >= args.no_cache_repeats:
                    continue
                torch.manual_seed(args.seed + r)  # generate samples from the global generator
                t0 = time.perf_counter()
                out = contenders[name](prompts[shape], shape[1], torch.Generator().manual_seed(args.seed + r))
                times[shape, name].append(time.perf_counter() - t0)
                assert out.shape == shape, (name, out.shape)
                print(f"  repeat {r}  {shape[0]}x{shape[1]}  {name:16s} {shape[0] * shape[1] / times[shape, name][-1]:8.1f} tokens/s",
                      flush=True)

    print(f"\n{'batch x new':12s} {'contender':18s} {'tokens/s':>9s} {'vs generate':>12s} {'vs nanowarp':>12s} {'runs':>5s}")
    for shape in shapes:
        B, N = shape
        rate = {n: B * N / statistics.median(t) for n, t in ((n, times[shape, n]) for n in names) if t}
        for name, tps in rate.items():
            ratio = f"{tps / rate['generate']:.2f}x" if "generate" in rate else "-"
            print(f"{B:>4d} x {N:<5d} {name:18s} {tps:9.1f} {ratio:>12s} {tps / rate['nanowarp']:11.2f}x "
                  f"{len(times[shape, name]):5d}")

    if args.profile:
        print("\nwhere the time goes")
        for B, N in shapes:
            breakdown(model, prompts[B, N], N)
            bound = matmul_floor(model, B, prompts[B, N].size(1), N)
            tps = B * N / statistics.median(times[(B, N), "nanowarp"])
            print(f"  nanowarp's median, {B}x{N}: {tps:.1f} tokens/s = {tps / bound:.1%} of that bound")
            generate_times = times.get(((B, N), "generate"))
            if generate_times:
                print(f"  so at most {bound * statistics.median(generate_times) / (B * N):.2f}x generate's "
                      f"median at {B}x{N}")
        if "generate" in contenders:
            B, N = shapes[0]
            profile_ops(lambda: contenders["generate"](prompts[B, N], N, None), f"generate, {B}x{N}")
            profile_ops(lambda: contenders["nanowarp"](prompts[B, N], N, None), f"nanowarp, {B}x{N}")


if __name__ == "__main__":
    main()
