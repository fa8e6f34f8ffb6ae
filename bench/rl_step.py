"""
One RL step, timed by phase: nanowarp against TRL's `RLOOTrainer` and against the reference
reimplementation's way, on the same random models, prompts and settings.

Shapes (random weights, nothing downloaded; tokenizers with one word per token id, as in
bench/device_check.py), by --model:

- --model gpt2 (the default), shapes tiny and gpt2 unless --shapes says otherwise:
  - tiny: the laptop reproduction's models (nanowarp/study/tiny.py: GPT-2 of 2 layers, width 128,
    vocabulary 4,096; DistilBERT of 1 layer, width 64), 64 completions x 40 new tokens;
  - gpt2: GPT-2 124M and a DistilBERT-base reward model, 16 completions x 32 new tokens;
- --model smollm2, shape smollm2 unless --shapes says otherwise:
  - smollm2: a Llama of SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads, 3 key/value heads,
    vocabulary 49,152; bench/policies.py says where the numbers come from) and the same
    DistilBERT-base reward model, 16 completions x 32 new tokens;
- smoke (either model): a few seconds on a CPU, for the test suite.

transformers' contenders get the same weights (GPT2LMHeadModel or LlamaForCausalLM), checked
before timing: one forward of each gives nanowarp's logits.

Every contender does RLOO with k = 4 (16 or 4 prompts x 4 completions), LoRA rank 8 (alpha 8)
on every linear of the blocks (GPT-2's c_attn, c_proj, c_fc; the Llama's q_proj, k_proj,
v_proj, o_proj, gate_proj, up_proj, down_proj), AdamW, KL coefficient 0.1,
temperature 1, no top-k / top-p, fp32. The reward is nanowarp's: the reward model's P(positive)
of the decoded prompt + completion, -1 without EOS (random weights rarely emit it, so nearly
every completion has all its tokens).

- nanowarp:  one step of `nanowarp.rl.rl_run`, timed by the split it logs;
- TRL:       one step of `trl.RLOOTrainer.train()` with `peft.LoraConfig` and the reward above as
             a reward function (when trl and peft are installed: `pip install nanowarp[bench]`,
             or `pip install trl peft`); its phases timed by wrapping its methods;
- reference: the reference reimplementation's way, written out below (`ReferenceWay`): a PEFT
             LoRA policy, `generate(use_cache=False)`, full-vocabulary `log_softmax` for the
             policy and the anchor, an EMA anchor updated over all its parameters.

Contenders run one step each per round, in a rotating order, so a slow spell of a shared machine
hits all of them; the table shows medians over rounds (the first round also warms up each
contender; its median hides it with 3 rounds or more) and each total's ratio to nanowarp's.

    python bench/rl_step.py --shapes tiny --repeats 3
    python bench/rl_step.py --shapes gpt2 --repeats 3       # ~8 minutes on 2 cores
    python bench/rl_step.py --model smollm2 --repeats 3
    python bench/rl_step.py --shapes tiny --profile          # + nanowarp's update by operator,
                                                             #   and its matmul-only floor
"""

import contextlib
import importlib.metadata
import importlib.util
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from device_check import random_resources  # noqa: E402
from nanowarp.config import Config, flag, parse_args as parse_flags  # noqa: E402
from nanowarp.padding import left_pad  # noqa: E402
from nanowarp.rl import build_policy, rl_run, rloo_advantages  # noqa: E402
from nanowarp.study import tiny  # noqa: E402
from policies import MODELS, PEFT_TARGETS, SMOKE, SMOLLM2_135M, family, hf_model, parity  # noqa: E402
from update_profile import profile_update  # noqa: E402

DISTILBERT_BASE = dict(vocab_size=28996, dim=768, n_layers=6, n_heads=12, hidden_dim=3072)
SMOKE_DISTILBERT = dict(vocab_size=600, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
SHAPES = {  # by --model; "gpt2" holds GPT2Config's fields, "llama" config.json's
    "gpt2": {
        "tiny": dict(gpt2=dict(vocab_size=tiny.POLICY_VOCAB, **tiny.GPT2_ARCH),
                     distilbert=dict(vocab_size=tiny.REWARD_VOCAB, **tiny.DISTILBERT_ARCH), batch=64, new_tokens=40),
        "gpt2": dict(gpt2=dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
                     distilbert=DISTILBERT_BASE, batch=16, new_tokens=32),
        "smoke": dict(gpt2=dict(SMOKE["gpt2"], n_positions=64, n_layer=2),
                      distilbert=SMOKE_DISTILBERT, batch=8, new_tokens=6),
    },
    "smollm2": {
        "smollm2": dict(llama=SMOLLM2_135M, distilbert=DISTILBERT_BASE, batch=16, new_tokens=32),
        "smoke": dict(llama=dict(SMOLLM2_135M, **SMOKE["smollm2"], num_hidden_layers=2, max_position_embeddings=64),
                      distilbert=SMOKE_DISTILBERT, batch=8, new_tokens=6),
    },
}
DEFAULT_SHAPES = {"gpt2": "tiny,gpt2", "smollm2": "smollm2"}
RLOO_K, LORA_RANK, LR, KL_COEF, EMA_RATE = 4, 8, 1e-3, 0.1, 1 / 60  # the tiny preset's RL settings
PHASES = ("sample", "score", "anchor", "policy", "optimizer", "ema")
PHASE_NAMES = dict(sample="sampling", score="scoring", anchor="anchor log-probs", policy="policy fwd+bwd",
                   optimizer="optimizer, rest", ema="EMA")
UNALIGNED = """\
Differences that cannot be aligned:
- TRL runs one more no-grad forward of the policy for its "old" log-probs (its clipped ratio
  needs them even with one update per batch; nanowarp takes the sampler's log-probs); it is
  counted in its anchor log-probs column, with the reference forward.
- TRL's reference model is fixed (the base model, its LoRA disabled), not an EMA of the policy:
  it has no EMA phase. The reference way's EMA runs over all the anchor's parameters.
- TRL's log-prob forwards also compute the entropy (its fused LM head), and it logs metrics;
  its "optimizer, rest" column is the rest of Trainer's step (clipping, AdamW, the scheduler,
  zeroing the gradients, the data loader, logging).
- TRL samples with transformers' `generate` and its KV cache; the reference way without a cache."""


@dataclass
class Args:
    model: str = flag("gpt2", f"the policy: {' or '.join(MODELS)} (GPT-2, or a Llama of SmolLM2-135M's shape)")
    shapes: str = flag("", "comma-separated shapes: tiny, gpt2, smoke with --model gpt2 (default: tiny,gpt2); "
                           "smollm2, smoke with --model smollm2 (default: smollm2)")
    contenders: str = flag("nanowarp,trl,reference", "comma-separated contenders (trl is skipped when "
                                                     "trl or peft is missing)")
    repeats: int = flag(3, "rounds; each contender runs one step per round, medians are reported")
    profile: bool = flag(False, "also profile nanowarp's update (top operators) and time its matmuls alone")
    threads: int = flag(2, "torch.set_num_threads; 0 keeps torch's default")
    seed: int = flag(0, "weights, prompts, sampling")


def parse_args(argv=None):
    return parse_flags(argv, Args, presets=None, description=__doc__, dashes=True)


def nanowarp_config(shape, seed):
    return Config(batch_size=shape["batch"], max_new_tokens=shape["new_tokens"], lora_rank=LORA_RANK,
                  lora_alpha=float(LORA_RANK), rloo_k=RLOO_K, steps=1, lr=LR, kl_coef=KL_COEF, ema_rate=EMA_RATE,
                  seed=seed)


def lora_config(config):
    """peft's LoRA on every linear of the blocks, as nanowarp's (lora_targets all)."""
    from peft import LoraConfig
    targets, fan_in_fan_out = PEFT_TARGETS[family(config)]
    return LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, lora_dropout=0.0, target_modules=targets,
                      fan_in_fan_out=fan_in_fan_out)


def reward_texts(res, prompts, tokens, finished):
    """nanowarp's reward of completions (lists of ids, up to and including EOS) of prompts (lists
    of ids): the text nanowarp.rl.decode gives the reward model."""
    texts = res.tokenizer.decode_batch([p + t for p, t in zip(prompts, tokens)], skip_special_tokens=True)
    return torch.where(finished.cpu(), res.reward.sources[0].score(texts), torch.tensor(-1.0))  # the −1 rule


# ---- the contenders ------------------------------------------------------------------------------------

class Nanowarp:
    """One step of nanowarp.rl.rl_run; the phases are the split it logs."""

    def __init__(self, theta, res, shape, seed):
        self.theta, self.res, self.cfg = theta, res, nanowarp_config(shape, seed)

    def step(self, round_):
        rows = []
        rl_run(self.theta, 0, self.cfg.seed + round_, self.cfg, self.res, rows.append)
        r = rows[0]
        return {p: r[f"time_{p}"] for p in PHASES}


class ReferenceWay:
    """The reference reimplementation's way, written out plainly: a PEFT LoRA policy on
    transformers' GPT-2 (or Llama), sampling with generate(use_cache=False) (every new token runs the whole
    sequence again), full-vocabulary log_softmax for the policy and the anchor, and an EMA anchor
    updated over all its parameters (the effective weights of the adapted ones)."""

    def __init__(self, theta, res, shape, seed):
        from peft import get_peft_model
        torch.manual_seed(seed)
        self.res, self.shape, self.seed = res, shape, seed
        self.policy = get_peft_model(hf_model(theta, res.model_config), lora_config(res.model_config))
        self.anchor = hf_model(theta, res.model_config).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW([p for p in self.policy.parameters() if p.requires_grad], lr=LR)

    def logprobs(self, model, ids, mask, n_prompt):
        """log π(y_k | x, y_<k) of the completion tokens: the logits of every position over the
        whole vocabulary, log_softmax, gather."""
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
        logp = torch.log_softmax(logits[:, n_prompt - 1:-1].float(), dim=-1)
        return logp.gather(-1, ids[:, n_prompt:, None]).squeeze(-1)

    @torch.no_grad()
    def ema(self):
        """θ_ema ← (1 − μ) θ_ema + μ θ over every parameter of the anchor, θ the policy's effective
        weights (W0 + s·B·A for the adapted ones: peft's merged weight)."""
        adapted = {name.removeprefix("base_model.model."): m for name, m in self.policy.named_modules()
                   if hasattr(m, "get_delta_weight")}
        policy = {name.removeprefix("base_model.model.").replace(".base_layer", ""): p
                  for name, p in self.policy.named_parameters() if "lora_" not in name}
        for name, p in self.anchor.named_parameters():
            w = policy[name]
            module = name.rpartition(".")[0]
            if module in adapted and name.endswith(".weight"):
                w = w + adapted[module].get_delta_weight("default")
            p.lerp_(w, EMA_RATE)

    def step(self, round_):
        res, B, N = self.res, self.shape["batch"], self.shape["new_tokens"]
        prompts = [res.prompts[i] for i in range(round_ * B // RLOO_K, (round_ + 1) * B // RLOO_K) for _ in range(RLOO_K)]
        eos = res.eos_id
        t0 = time.perf_counter()
        ids, mask = left_pad(prompts, eos)
        self.policy.eval()
        torch.manual_seed(self.seed + round_)
        with torch.no_grad():
            out = self.policy.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
                                       temperature=1.0, max_new_tokens=N, use_cache=False, pad_token_id=eos)
        tokens = out[:, ids.size(1):]
        is_eos = tokens == eos
        finished = is_eos.any(1)
        # a completion runs up to and including its first EOS
        done_before = (is_eos.cumsum(1) - is_eos.long()) > 0
        completion_mask = ~done_before
        t1 = time.perf_counter()
        rewards = reward_texts(res, prompts, [row[m].tolist() for row, m in zip(tokens, completion_mask)], finished)
        t2 = time.perf_counter()
        full_ids = torch.cat([ids, tokens], 1)
        full_mask = torch.cat([mask, completion_mask.long()], 1)
        m = completion_mask.float()
        with torch.no_grad():
            anchor_lp = self.logprobs(self.anchor, full_ids, full_mask, ids.size(1))
            policy_lp_old = self.logprobs(self.policy, full_ids, full_mask, ids.size(1))
        kl = ((policy_lp_old - anchor_lp) * m).sum(1)
        adv = rloo_advantages(rewards - KL_COEF * kl, RLOO_K)
        t3 = time.perf_counter()
        self.policy.train()
        self.opt.zero_grad()
        logp = self.logprobs(self.policy, full_ids, full_mask, ids.size(1))
        loss = -(adv * (logp * m).sum(1)).mean()
        loss.backward()
        t4 = time.perf_counter()
        self.opt.step()
        t5 = time.perf_counter()
        self.ema()
        t6 = time.perf_counter()
        return dict(sample=t1 - t0, score=t2 - t1, anchor=t3 - t2, policy=t4 - t3, optimizer=t5 - t4, ema=t6 - t5)


class TRL:
    """trl.RLOOTrainer on the same model, prompts and reward; one trainer.train() of one step per
    round. Its phases are timed by wrapping its methods: _generate (sampling), _calculate_rewards
    (scoring), _get_per_token_logps_and_entropies without gradient (old and reference log-probs)
    and with it, plus accelerator.backward (policy forward and backward); the rest of the step,
    from a callback's on_step_begin to its on_step_end, is "optimizer, rest"."""

    def __init__(self, theta, res, shape, seed, folder):
        import datasets
        import trl
        from transformers import PreTrainedTokenizerFast, TrainerCallback
        eos = res.eos_id
        eos_word = res.tokenizer.id_to_token(eos)
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=res.tokenizer, eos_token=eos_word, pad_token=eos_word)
        n_prompts = shape["batch"] // RLOO_K
        dataset = datasets.Dataset.from_dict({"prompt": res.tokenizer.decode_batch(res.prompts[:n_prompts * 16])})

        def reward(prompts, completions, completion_ids, **kwargs):
            finished = torch.tensor([len(c) > 0 and c[-1] == eos for c in completion_ids])
            prompt_ids = [res.tokenizer.encode(p).ids for p in prompts]
            return reward_texts(res, prompt_ids, completion_ids, finished).tolist()

        args = trl.RLOOConfig(
            output_dir=folder, per_device_train_batch_size=shape["batch"], num_generations=RLOO_K,
            max_completion_length=shape["new_tokens"], temperature=1.0, top_k=0, top_p=1.0, beta=KL_COEF,
            learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, max_steps=1, seed=seed,
            gradient_checkpointing=False, bf16=False, use_cpu=True, report_to="none", save_strategy="no",
            logging_steps=10**6, disable_tqdm=True, dataloader_num_workers=0)
        self.times, self.stamps = {}, {}
        times, stamps = self.times, self.stamps

        class Clock(TrainerCallback):
            def on_step_begin(self, *a, **kw):
                stamps["begin"] = time.perf_counter()

            def on_step_end(self, *a, **kw):
                stamps["end"] = time.perf_counter()

        self.trainer = trl.RLOOTrainer(model=hf_model(theta, res.model_config), reward_funcs=reward, args=args,
                                       train_dataset=dataset, processing_class=tokenizer,
                                       peft_config=lora_config(res.model_config), callbacks=[Clock()])

        def timed(obj, name, phase):
            fn = getattr(obj, name)

            def wrapper(*a, **kw):
                t0 = time.perf_counter()
                out = fn(*a, **kw)
                key = phase() if callable(phase) else phase
                times[key] = times.get(key, 0.0) + time.perf_counter() - t0
                return out
            setattr(obj, name, wrapper)

        timed(self.trainer, "_generate", "sample")
        timed(self.trainer, "_calculate_rewards", "score")
        timed(self.trainer, "_get_per_token_logps_and_entropies",
              lambda: "policy" if torch.is_grad_enabled() else "anchor")
        timed(self.trainer.accelerator, "backward", "policy")

    def step(self, round_):
        self.times.clear()
        with contextlib.redirect_stdout(io.StringIO()):  # Trainer prints its metrics at the end of train()
            self.trainer.train()
        total = self.stamps["end"] - self.stamps["begin"]
        out = {p: self.times.get(p, 0.0) for p in ("sample", "score", "anchor", "policy")}
        out["optimizer"], out["ema"] = total - sum(out.values()), 0.0
        return out


# ---- main ------------------------------------------------------------------------------------------

def build(name, theta, res, shape, seed, folder):
    if name == "nanowarp":
        return Nanowarp(theta, res, shape, seed)
    if name == "reference":
        return ReferenceWay(theta, res, shape, seed)
    return TRL(theta, res, shape, seed, folder)


def available(names):
    """The contenders whose packages are installed, with a line for each one skipped."""
    out = []
    for name in names:
        needs = {"trl": ("trl", "peft", "datasets", "transformers"), "reference": ("peft", "transformers")}.get(name, ())
        missing = [m for m in needs if not _importable(m)]
        if missing:
            print(f"{name}: skipped, {', '.join(missing)} not installed (pip install nanowarp[bench])")
        else:
            out.append(name)
    return out


def _importable(module):
    return importlib.util.find_spec(module) is not None


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model not in MODELS:
        raise SystemExit(f"unknown --model {args.model!r}: choose from {', '.join(MODELS)}")
    shapes, table = (args.shapes or DEFAULT_SHAPES[args.model]).split(","), SHAPES[args.model]
    unknown = [s for s in shapes if s not in table]
    if unknown:
        raise SystemExit(f"unknown shape(s) {', '.join(unknown)} for --model {args.model}: "
                         f"choose from {', '.join(table)}")
    names = available(args.contenders.split(","))
    versions = ", ".join(f"{m} {importlib.metadata.version(m)}" for m in ("transformers", "trl", "peft") if _importable(m))
    print(f"{time.strftime('%Y-%m-%d')}  {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads, {versions}")
    targets = ", ".join(PEFT_TARGETS["gpt2" if args.model == "gpt2" else "llama"][0])
    print(f"--model {args.model}: RLOO k={RLOO_K}, LoRA rank {LORA_RANK} on {targets}, AdamW lr {LR}, KL coefficient "
          f"{KL_COEF}, fp32, random weights")

    results = {}
    for shape_name in shapes:
        shape = dict(table[shape_name], lora_rank=LORA_RANK)
        with tempfile.TemporaryDirectory() as folder:
            theta, res = random_resources(shape, torch.device("cpu"), torch.float32, folder, seed=args.seed)
            if set(names) - {"nanowarp"}:  # transformers' copy computes nanowarp's logits
                with torch.random.fork_rng(devices=[]):  # the contenders draw what they would without it
                    parity(hf_model(theta, res.model_config).eval(), build_policy(theta, res.model_config, "cpu").eval())
            contenders = {n: build(n, theta, res, shape, args.seed, folder) for n in names}
            times = {n: [] for n in names}
            for r in range(args.repeats):
                for name in names[r % len(names):] + names[:r % len(names)]:  # rotating order
                    phases = contenders[name].step(r)
                    times[name].append(phases)
                    print(f"  {shape_name}, round {r}, {name:10s} {sum(phases.values()):7.2f} s  " +
                          " ".join(f"{p} {v:.3f}" for p, v in phases.items()), flush=True)
            results[shape_name] = times
            if args.profile and "nanowarp" in names:
                profile_update(theta, res, shape, nanowarp_config(shape, args.seed), RLOO_K, args.seed, PHASE_NAMES)

    print(f"\nmedians over {args.repeats} rounds, seconds per RL step")
    print(f"{'shape':32s} {'contender':10s} {'total':>7s} {'vs nanowarp':>11s}  " +
          " ".join(f"{PHASE_NAMES[p]:>16s}" for p in PHASES))
    for shape_name, times in results.items():
        shape = table[shape_name]
        what = f"{shape_name} ({shape['batch']} x {shape['new_tokens']} tokens)"
        total = {n: statistics.median(sum(ph.values()) for ph in t) for n, t in times.items()}
        for name, t in times.items():
            ratio = f"{total[name] / total['nanowarp']:.2f}x" if "nanowarp" in total else "-"
            print(f"{what:32s} {name:10s} {total[name]:7.2f} {ratio:>11s}  " +
                  " ".join(f"{statistics.median(ph[p] for ph in t):16.3f}" for p in PHASES))
    print("\n" + UNALIGNED)


if __name__ == "__main__":
    main()
