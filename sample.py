"""
Sample completions from one or more policies side by side: for each prompt, K completions of
every --model, with their rewards, to see what training did to the text.

Every model draws the same random numbers: the K completions of prompt i are sampled together from
one generator seeded from (--seed, i), made again for each model (as eval.py seeds its batches).
Two copies of a model write the same completions, and models that are close write similar ones, so
what differs comes from the models rather than from the draw. With --reward_model, --reward_fn or
--reward_url, each completion's reward as train.py computes it (docs/rewards.md): e.g. P(positive) of
prompt + completion, or -1 for a completion that did not end (no EOS within --max_new_tokens); with
--judge, an independent classifier's P(positive) (no -1 rule). Prompts are tokenized with the first model's tokenizer, which decodes every model's
completions: the models must share its vocabulary; --chat_template makes each the user's turn of that
model's chat template. Every prompt must fit the smallest context beside --max_new_tokens (or
--truncate_prompts left), checked before any model is loaded.

    python sample.py --model lvwerra/gpt2-imdb runs/warp/iter_2/liti --prompt "This movie was" \\
        --prompt "I went to see it because" --num_samples 3 --max_new_tokens 48 \\
        --reward_model lvwerra/distilbert-imdb

prints a table per prompt; --json prints the same as JSON, for scripts.
"""

import json
import os
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run from anywhere without installing

from nanowarp import hub  # noqa: E402
from nanowarp.config import (RewardFlags, fail, flag, keep_api_key, parse_args as parse_flags,  # noqa: E402
                             prompt_key_flag, resolve_device, same_flag, truncate_prompts_flag)
from nanowarp.data import DataError  # noqa: E402
from nanowarp.evaluate import batch_seed  # noqa: E402
from nanowarp.models import eos_ids, from_pretrained, load_config  # noqa: E402
from nanowarp.prompts import load_prompt_dataset, make_prompt_set, max_prompt_tokens  # noqa: E402
from nanowarp.reward import RewardError, RewardModel, decode_texts, load_reward  # noqa: E402
from nanowarp.sampling import sample  # noqa: E402
from nanowarp.tokenizer import load_tokenizer  # noqa: E402


@dataclass
class Args(RewardFlags):
    model: tuple = flag(None, "policies to sample from: checkpoint folders or Hub ids, sharing the first's vocabulary",
                        required=True, nargs="+", metavar="DIR")
    prompt: tuple = flag(None, "a prompt, as it is (repeat the flag for several)", action="append", metavar="TEXT")
    prompts: str = flag(None, "also the prompts of a dataset: text, one per line; .jsonl, .json or .parquet rows, "
                              "a \"prompt\" string or \"messages\" each (docs/usage.md#prompt-datasets)",
                        metavar="PATH")
    prompt_key: str = prompt_key_flag()
    truncate_prompts: str = truncate_prompts_flag("the smallest --model context")
    chat_template: bool = flag(False, "give each prompt as a user turn of the first --model's chat template "
                                      "(tokenizer_config.json; pip install jinja2), as train.py --chat_template does")
    num_samples: int = flag(3, "completions per prompt and model", metavar="K")
    max_new_tokens: int = flag(48, "maximum completion length, in tokens", metavar="N")
    temperature: float = flag(1.0, "sampling temperature", metavar="T")
    seed: int = flag(0, "sampling seed: the same random numbers for every model", metavar="S")
    reward_model: str = flag(None, "reward model (a classifier or a scalar reward model): each completion's reward, "
                                   "e.g. P(positive) of prompt + completion, -1 without EOS", metavar="DIR")
    reward_kind: str = same_flag("reward_kind")
    reward_label: str = same_flag("reward_label")
    no_eos_penalty: float = same_flag("no_eos_penalty")
    judge: str = flag(None, "an independent sentiment classifier: each completion's P(positive)", metavar="DIR")
    json: bool = flag(False, "print JSON (for scripts) instead of tables")
    device: str = flag("auto", "cpu, cuda, cuda:N, or auto")
    dtype: str = flag("float32", "bfloat16: the models and classifiers run in bf16", choices=["float32", "bfloat16"])

    def __post_init__(self):
        self.reward_api_key = keep_api_key(self.reward_api_key)


def parse_args(argv=None):
    return parse_flags(argv, Args, presets=None, description=__doc__)


def validate(args):
    checks = [
        (args.prompt or args.prompts, "no prompt: give --prompt TEXT (once per prompt) and/or --prompts PATH"),
        (args.num_samples >= 1, f"--num_samples must be >= 1, got {args.num_samples}"),
        (args.max_new_tokens >= 1, f"--max_new_tokens must be >= 1, got {args.max_new_tokens}"),
        (args.temperature > 0, f"--temperature must be > 0, got {args.temperature}"),
    ]
    for ok, message in checks:
        if not ok:
            fail("sample.py", message)


def load_policy(name, first=None):
    """A policy (any models.from_pretrained architecture) from a folder or Hub id; with `first` (its
    config), check it shares that vocabulary."""
    try:
        model = from_pretrained(name)
    except hub.CheckpointError as e:
        fail("sample.py", f"--model {name}: {e}")
    if first is not None and (model.config.vocab_size, model.config.eos_token_id) != \
            (first.vocab_size, first.eos_token_id):
        fail("sample.py", f"--model {name} has vocab_size={model.config.vocab_size}, eos={model.config.eos_token_id} "
                          f"but the first --model has vocab_size={first.vocab_size}, eos={first.eos_token_id}: "
                          f"its tokenizer must decode every model's completions")
    return model.eval()


@torch.no_grad()
def sample_model(model, eos_id, prompts, tokenizer, args, reward=None, judge=None):
    """For each prompt (token-id lists), args.num_samples completions of `model`, each ending at
    eos_id (or any of a list): one list of dicts (completion, finished, length, and reward / judge
    when a nanowarp.reward.Reward / a judge classifier are given) per prompt."""
    device, K = model.lm_head.weight.device, args.num_samples
    out = []
    for i, prompt in enumerate(prompts):
        generator = torch.Generator(device).manual_seed(batch_seed(args.seed, i))  # the same for every model
        batch = [prompt] * K
        sampled = sample(model, batch, args.max_new_tokens, eos_token_id=eos_id, temperature=args.temperature,
                         generator=generator)
        n_tokens = sampled.mask.sum(1).cpu()
        finished = sampled.finished.cpu()
        ends = (n_tokens - finished.long()).tolist()  # EOS excluded
        completions = tokenizer.decode_batch([t[:n] for t, n in zip(sampled.tokens.tolist(), ends)],
                                             skip_special_tokens=True)
        rows = [dict(completion=c, finished=bool(f), length=int(n)) for c, f, n in zip(completions, finished, n_tokens)]
        texts = decode_texts(tokenizer, batch, sampled.tokens, n_tokens)
        scores = dict(reward=reward.score(texts, finished)[0] if reward else None,
                      judge=judge.score(texts.queries) if judge else None)  # prompt + completion, no -1 rule
        for key, values in scores.items():
            for row, score in zip(rows, values.tolist() if values is not None else ()):
                row[key] = score
        out.append(rows)
    return out


def print_tables(result):
    """Per prompt, per sample: each model's completion on one line, the scores before it."""
    width = max(len(n) for n in result["models"])
    for i, p in enumerate(result["prompts"], 1):
        print(f"=== prompt {i}/{len(result['prompts'])}: {p['prompt']!r}")
        for k in range(result["num_samples"]):
            print(f"--- sample {k + 1}")
            for m in p["models"]:
                c = m["samples"][k]
                scores = "".join(f"{key} {c[key]:6.3f}  " for key in ("reward", "judge") if key in c)
                ending = "" if c["finished"] else " [...]"  # no EOS within --max_new_tokens
                print(f"{m['model']:<{width}}  {scores}| {c['completion']!r}{ending}")
        print()


def main(argv=None):
    args = parse_args(argv)
    validate(args)

    # 1. inputs: a missing folder or prompt file fails before anything large is loaded
    try:
        for name in (*args.model, *([args.reward_model] if args.reward_model else []),
                     *([args.judge] if args.judge else [])):
            hub.resolve(name)
        folder = hub.resolve(args.model[0])  # its tokenizer and chat template; every model's context
        tokenizer = load_tokenizer(folder)
        context = min(load_config(hub.resolve(name)).n_positions for name in args.model)
        fit = dict(template=folder, chat=args.chat_template, truncate=args.truncate_prompts,
                   max_tokens=max_prompt_tokens(context, args.max_new_tokens))
        given = list(args.prompt or ())
        prompts = make_prompt_set([f"--prompt {i}" for i in range(1, len(given) + 1)], given, {}, tokenizer, **fit).ids
        if args.prompts:
            prompts += load_prompt_dataset(args.prompts, tokenizer, args.prompt_key, **fit).ids
    except (DataError, hub.CheckpointError, ValueError) as e:
        fail("sample.py", str(e))
    device, dtype = resolve_device(args.device), getattr(torch, args.dtype)
    try:
        reward = load_reward(args, device, dtype) if args.reward_model or args.reward_fn or args.reward_url else None
        judge = RewardModel(args.judge, device, dtype=dtype) if args.judge else None
    except (hub.CheckpointError, ValueError) as e:
        fail("sample.py", str(e))

    # 2. each model in turn (one in memory): K completions of every prompt
    first, per_model = None, []
    for name in args.model:
        model = load_policy(name, first).to(device, dtype)
        first = first or model.config
        if max(max(p) for p in prompts) >= model.config.vocab_size:
            fail("sample.py", f"the first --model's tokenizer gives token ids beyond the vocabulary of --model {name} "
                              f"({model.config.vocab_size})")
        try:
            per_model.append(sample_model(model, eos_ids(name, model.config), prompts, tokenizer, args, reward, judge))
        except RewardError as e:
            fail("sample.py", str(e))
        del model  # before loading the next one

    # 3. per prompt, every model's completions
    result = dict(models=list(args.model), reward_model=args.reward_model, reward_fn=list(args.reward_fn),
                  reward_url=list(args.reward_url), judge=args.judge, seed=args.seed,
                  temperature=args.temperature, max_new_tokens=args.max_new_tokens, num_samples=args.num_samples,
                  prompts=[dict(prompt=text, models=[dict(model=name, samples=rows[i])
                                                     for name, rows in zip(args.model, per_model)])
                           for i, text in enumerate(tokenizer.decode_batch(prompts, skip_special_tokens=True))])
    if args.json:
        print(json.dumps(result, indent=1, ensure_ascii=False))
    else:
        print_tables(result)


if __name__ == "__main__":
    main()
