"""
Every hyperparameter of a WARP job in one dataclass, with the defaults of the reference
reproduction (SPEC §2: GPT-2 on IMDB), and presets as plain data.

`parse_args` turns the dataclass into command-line flags: one flag per field, its help the field's one-line
comment, so `python train.py --help` documents everything; `validate` rejects impossible values, `resolve_device`
turns --device into a torch.device. Every script parses its `Args` the same way, and reports a user error with `fail`.
"""

import argparse
import dataclasses
import json
import os
import shlex
import sys
from dataclasses import dataclass, field

import torch

from nanowarp.logger import check_report_to
from nanowarp.presets import PRESETS  # noqa: F401 (--preset's table; config.PRESETS as before)


def flag(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


def prompt_key_flag():
    """--prompt_key, the same in every script that reads prompt datasets."""
    return flag("prompt", "--prompts: the field of a row that holds its prompt", metavar="NAME")


def truncate_prompts_flag(context="the policy's context"):
    """--truncate_prompts, the same in every script that reads prompts; `context`: whose it is."""
    return flag("none", f"a prompt longer than {context} leaves beside --max_new_tokens: none = stop at load, "
                        f"naming its line; left = keep its last tokens", choices=["none", "left"])


def penalty(text):
    """--no_eos_penalty: a number, or none (kept as the string "none")."""
    return "none" if text.lower() == "none" else float(text)


@dataclass
class Config:
    # what to run
    stage: str = flag("warp", "warp: WARP iterations; reward: train the reward model; sft: fine-tune the SFT policy",
                      choices=["warp", "reward", "sft"])
    preset: str = flag("reference", "named set of defaults (nanowarp/presets.py); explicit flags override it",
                       choices=["reference", "rloo", "paper", "tiny", "tiny_sentiment"])
    # models and data
    policy: str = flag("lvwerra/gpt2-imdb", "SFT policy: Hub id or local folder (Hugging Face layout)")
    reward_model: str = flag(None, "reward model: a sequence classifier or a scalar reward model, Hub id or local folder; "
                                   "None: lvwerra/distilbert-imdb unless --reward_fn or --reward_url is given",
                             metavar="DIR")
    reward_fn: tuple = flag((), "reward functions, each NAME(prompts=[...], completions=[...], **columns) -> one float "
                                "per completion, columns the prompt rows' other fields (docs/rewards.md)",
                            nargs="+", metavar="FILE.py:NAME")
    reward_url: tuple = flag((), "reward servers speaking OpenRLHF's protocol, e.g. serve_reward.py's "
                                 "http://127.0.0.1:5000/get_reward (docs/rewards.md)", nargs="+", metavar="URL")
    reward_weights: tuple = flag((), "one weight per reward source, in the order reward_model, reward_fn..., "
                                     "reward_url...; none given: 1 each", nargs="+", type=float, metavar="W")
    data: str = flag("data/imdb/prepared", "folder written by data/imdb/prepare.py")
    out_dir: str = flag("runs/warp", "where checkpoints and metrics.jsonl go")
    # WARP (Algorithm 1)
    iterations: int = flag(2, "I: WARP iterations")
    runs: int = flag(2, "M: independent RL runs per iteration, merged by SLERP")
    steps: int = flag(100, "T: RL steps per run")
    ema_rate: float = flag(0.01, "mu: EMA anchor update rate, (0, 1]")
    liti_rate: float = flag(0.5, "eta: LITI rate, theta_init <- (1-eta) theta_init + eta theta_slerp, [0, 1]")
    kl_coef: float = flag(0.1, "beta: KL coefficient of the regularised reward")
    merge: str = flag("slerp", "how the M runs are merged", choices=["slerp", "lerp"])
    anchor: str = flag("ema", "KL anchor: ema (WARP) or init (a fixed anchor, for ablations)", choices=["ema", "init"])
    # RL
    batch_size: int = flag(64, "completions per step (prompts per step = batch_size / rloo_k)")
    rloo_k: int = flag(1, "completions per prompt: 1 = REINFORCE, k > 1 = RLOO with a leave-one-out baseline")
    whiten: bool = flag(False, "whiten advantages over the batch")
    kl_per_token: bool = flag(False, "token t pays the KL from t on, not before (same expected gradient, less noise)")
    max_new_tokens: int = flag(128, "maximum completion length")
    temperature: float = flag(1.0, "sampling temperature (also used for every log-prob)")
    lr: float = flag(1e-4, "the RL optimizer's peak learning rate")
    optimizer: str = flag("adamw", "RL: adamw, or momentum (Adam without 2nd moment; --adam_beta1 0: SGD)",
                          choices=["adamw", "momentum"])
    adam_beta1: float = flag(0.9, "the RL optimizer's beta1, the gradients' moving average")
    adam_beta2: float = flag(0.999, "AdamW's beta2 in the RL runs, the squared gradients' moving average")
    adam_epsilon: float = flag(1e-8, "AdamW's epsilon in the RL runs")
    warmup: int = flag(20, "linear warm-up steps, then linear decay to 0")
    weight_decay: float = flag(0.0, "AdamW weight decay")
    grad_clip: float = flag(0.0, "clip the gradient norm to this value; 0 = no clipping")
    lora_rank: int = flag(32, "LoRA rank on each --lora_targets linear")
    lora_alpha: float = flag(32.0, "LoRA alpha; scale = alpha / rank")
    lora_dropout: float = flag(0.0, "LoRA dropout")
    lora_targets: str = flag("all", "linear layers that get LoRA: all (those of the blocks), or names joined by commas "
                                    "from q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj (Llama layout), "
                                    "c_attn,c_proj,c_fc (GPT-2)", metavar="NAMES")
    reward_kind: str = flag("prob", "reward model: prob = P(rewarded label) (sigmoid for a multi-label classifier), "
                                    "logit = its raw logit; a scalar reward model (one label) gives its logit",
                            choices=["prob", "logit"])
    reward_input: str = flag("prompt_completion", "what the reward model reads: prompt_completion or completion",
                             choices=["prompt_completion", "completion"])
    no_eos_penalty: float = flag(-1.0, "reward of a completion that emitted no EOS within max_new_tokens; none: no "
                                       "such rule", type=penalty, metavar="R|none")
    label_key: str = flag(None, "--reward_url: the prompt rows' column sent as the labels of OpenRLHF's protocol "
                                "(None: empty strings)", metavar="NAME")
    reward_api_key: str = flag(None, "--reward_url: bearer token sent to the reward server; None: "
                                     "$NANOWARP_REWARD_API_KEY (never written to job.json)", metavar="TOKEN")
    micro_batch_size: int = flag(0, "completions sampled, scored and back-propagated at a time, gradients accumulated "
                                    "(same result, less memory); a multiple of rloo_k; 0 = the whole batch")
    gradient_checkpointing: bool = flag(False, "recompute each block's activations in the backward pass: less memory, "
                                               "one more forward of the blocks, the same gradients (RL, reward, sft)")
    # reward-model and SFT stages
    reward_base: str = flag("distilbert-base-cased", "--stage reward: the base model to fine-tune")
    epochs: float = flag(1.0, "--stage reward/sft: passes over the training reviews")
    train_batch_size: int = flag(32, "--stage reward/sft: batch size")
    train_lr: float = flag(1.41e-5, "--stage reward/sft: AdamW learning rate, linear decay to 0")
    train_warmup: int = flag(0, "--stage reward/sft: linear warm-up steps before the decay (at most a tenth of the run)")
    max_length: int = flag(512, "--stage reward/sft: truncate training texts to this many tokens")
    train_split: str = flag("all", "--stage reward: all the training reviews, or one of two disjoint halves (a: even "
                                   "positions, b: odd; both labels in each)", choices=["all", "a", "b"])
    windows: int = flag(0, "--stage reward: also learn from N random windows of consecutive words of each review, "
                           "labelled as the review: texts as short as the completions it will score")
    min_window_words: int = flag(5, "--stage reward: the shortest window, in words")
    max_window_words: int = flag(60, "--stage reward: the longest window, in words")
    # system
    seed: int = flag(0, "base seed; run m of iteration i uses seed + (i-1)*M + m")
    device: str = flag("auto", "cpu, cuda, cuda:N, or auto")
    dtype: str = flag("float32", "bfloat16: frozen weights, EMA anchor's forward copy, reward model and sampler in bf16; "
                                 "LoRA, AdamW, EMA master, log-probs, KL and merges float32 (docs/precision.md)",
                      choices=["float32", "bfloat16"])
    workers: int = flag(0, "processes training runs in parallel; 0 = one per visible CUDA device (1 on a CPU)")
    threads: int = flag(0, "CPU threads per process; 0 = this machine's threads split evenly between the workers")
    log_every: int = flag(1, "print a progress line every N steps (metrics.jsonl gets every step)")
    # other prompt sets and classifiers; logging
    prompts: str = flag(None, "prompt dataset to train on instead of --data's: text, one per line; .jsonl, .json "
                              "or .parquet rows, a \"prompt\" string or \"messages\" each, other fields columns "
                              "(docs/usage.md#prompt-datasets)", metavar="PATH")
    prompt_key: str = prompt_key_flag()
    truncate_prompts: str = truncate_prompts_flag()
    chat_template: bool = flag(False, "give each prompt to the policy as a user turn of its chat template "
                                      "(tokenizer_config.json; pip install jinja2)")
    reward_label: str = flag(None, "the reward model's label that is rewarded, a name or an index; None: the one "
                                   "named POSITIVE (a classifier without one is refused)", metavar="NAME")
    report_to: str = flag("none", "also log metrics and completions to tensorboard or wandb (pip install it)",
                          choices=["none", "tensorboard", "wandb"])
    log_completions: int = flag(0, "every N steps, write a few (prompt, completion, reward, kl) rows to "
                                   "OUT/completions.jsonl; 0 = off", metavar="N")
    test_limit: int = flag(0, "--stage reward/sft: score N test reviews, evenly spaced; 0 = all", metavar="N")
    save_every: int = flag(0, "also save a run's (or --stage reward/sft's) training state every N steps, to resume "
                              "inside it; 0 = off")
    fresh: bool = flag(False, "delete the earlier job's results in --out_dir and start over, instead of resuming it")

    def __post_init__(self):
        self.reward_model = default_reward_model(self)
        self.reward_api_key = keep_api_key(self.reward_api_key)
        # lists, as the command line and job.json give them (a default is a tuple): equal configs compare equal
        self.reward_fn, self.reward_url, self.reward_weights = (list(v) for v in (self.reward_fn, self.reward_url,
                                                                                   self.reward_weights))


def default_reward_model(cfg):
    """--reward_model, or the default reward model when no reward is named at all."""
    return cfg.reward_model or (None if cfg.reward_fn or cfg.reward_url else "lvwerra/distilbert-imdb")


def keep_api_key(token):
    """A --reward_api_key goes to the environment (NANOWARP_REWARD_API_KEY, which the worker processes
    inherit and the reward client reads), not into the config: job.json, model cards and loggers
    never see it. Returns the field's value: None."""
    if token:
        os.environ["NANOWARP_REWARD_API_KEY"] = token
    return None


# Flags a resumed job may change: they do not change what the job computes (--device, --threads and
# --micro_batch_size only in the last bits; --gradient_checkpointing not at all). --iterations may grow: iteration
# i never depends on I, so a finished job can be extended. --preset is not compared, the values it sets are.
# reward_base .. max_window_words are other stages'; the last two only log.
RESUME_FREE = ("out_dir", "fresh", "preset", "iterations", "workers", "threads", "device", "micro_batch_size",
               "gradient_checkpointing", "log_every", "save_every", "reward_base", "epochs", "train_batch_size",
               "train_lr", "train_warmup", "max_length", "test_limit", "train_split", "windows", "min_window_words",
               "max_window_words", "report_to", "log_completions", "reward_api_key")

def same_flag(name):
    """A fresh field of Config's flag `name`, for another script's flags that mean the same (eval.py, sample.py)."""
    f = next(f for f in dataclasses.fields(Config) if f.name == name)
    return field(default=f.default, metadata=f.metadata)


@dataclass
class RewardFlags:
    """The reward flags eval.py's and sample.py's Args share with train.py's (their base class)."""
    reward_fn: tuple = same_flag("reward_fn")
    reward_url: tuple = same_flag("reward_url")
    reward_weights: tuple = same_flag("reward_weights")
    reward_input: str = same_flag("reward_input")
    label_key: str = same_flag("label_key")
    reward_api_key: str = same_flag("reward_api_key")


def changed_flags(earlier, now, free=()):
    """The settings (dicts of flag values) that differ between an earlier run and this one, those
    in `free` aside, each as "--name old (now new)"."""
    return [f"--{k} {earlier.get(k, '(unset)')} (now {now.get(k, '(unset)')})"
            for k in sorted(set(earlier) | set(now)) if k not in free and earlier.get(k, "(unset)") != now.get(k, "(unset)")]


def validate(cfg):
    """Reject impossible hyperparameters with a message that names the flag."""
    checks = [
        (cfg.iterations >= 1, f"--iterations must be >= 1, got {cfg.iterations}"),
        (cfg.runs >= 1, f"--runs (M) must be >= 1, got {cfg.runs}"),
        (cfg.steps >= 1, f"--steps must be >= 1, got {cfg.steps}"),
        (0 < cfg.ema_rate <= 1, f"--ema_rate (mu) must be in (0, 1], got {cfg.ema_rate}"),
        (0 <= cfg.liti_rate <= 1, f"--liti_rate (eta) must be in [0, 1], got {cfg.liti_rate}"),
        (cfg.kl_coef >= 0, f"--kl_coef must be >= 0, got {cfg.kl_coef}"),
        (cfg.rloo_k >= 1, f"--rloo_k must be >= 1, got {cfg.rloo_k}"),
        (cfg.batch_size >= cfg.rloo_k and cfg.batch_size % cfg.rloo_k == 0,
         f"--batch_size ({cfg.batch_size}) must be a positive multiple of --rloo_k ({cfg.rloo_k})"),
        (cfg.max_new_tokens >= 1, f"--max_new_tokens must be >= 1, got {cfg.max_new_tokens}"),
        (cfg.temperature > 0, f"--temperature must be > 0, got {cfg.temperature}"),
        (cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}"),
        (not (cfg.kl_per_token and cfg.whiten), "--kl_per_token and --whiten together: choose one"),
        (cfg.warmup >= 0, f"--warmup must be >= 0, got {cfg.warmup}"),
        (0 <= cfg.adam_beta1 < 1 and 0 <= cfg.adam_beta2 < 1 and cfg.adam_epsilon > 0, f"--adam_beta1 and --adam_beta2 "
         f"must be in [0, 1), --adam_epsilon > 0; got {cfg.adam_beta1}, {cfg.adam_beta2}, {cfg.adam_epsilon}"),
        (cfg.lora_rank >= 1, f"--lora_rank must be >= 1, got {cfg.lora_rank}"),
        (cfg.workers >= 0, f"--workers must be >= 0 (0 = one per CUDA device), got {cfg.workers}"),
        (cfg.threads >= 0, f"--threads must be >= 0 (0 = automatic), got {cfg.threads}"),
        (cfg.save_every >= 0, f"--save_every must be >= 0 (0 = off), got {cfg.save_every}"),
        (cfg.log_completions >= 0, f"--log_completions must be >= 0 (0 = off), got {cfg.log_completions}"),
        (cfg.test_limit >= 0, f"--test_limit must be >= 0 (0 = all), got {cfg.test_limit}"),
        (cfg.micro_batch_size >= 0 and cfg.micro_batch_size % cfg.rloo_k == 0,
         f"--micro_batch_size ({cfg.micro_batch_size}) must be 0 (the whole batch) or a positive multiple of "
         f"--rloo_k ({cfg.rloo_k}), so that each prompt's {cfg.rloo_k} completions stay in one micro-batch"),
        (not cfg.reward_weights or len(cfg.reward_weights) == len(reward_sources(cfg)),
         f"--reward_weights has {len(cfg.reward_weights)} values for the {len(reward_sources(cfg))} reward sources "
         f"{', '.join(reward_sources(cfg))} (one weight each, in that order)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    check_report_to(cfg.report_to)  # a missing package fails now, not after the first run


def reward_sources(cfg):
    """The reward sources a config names, in the order of --reward_weights."""
    return ([f"--reward_model {cfg.reward_model}"] if cfg.reward_model else []) + \
        [f"--reward_fn {f}" for f in cfg.reward_fn] + [f"--reward_url {u}" for u in cfg.reward_url]


def resolve_device(name):
    """--device as a torch.device: auto is cuda when a GPU is visible, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every default (a list as the values one would type: `1`, not `['1']`), and the
    script's docstring as written."""

    def _get_help_string(self, action):
        if isinstance(action.default, (list, tuple)):
            return f"{action.help} (default: {' '.join(map(str, action.default))})".replace("%", "%%")
        return super()._get_help_string(action)


def parse_args(argv=None, cls=Config, presets=PRESETS, description=None, dashes=False):
    """Parse flags into a `cls` instance: one flag per field, its argparse settings (help, choices,
    nargs, ...) in the field's metadata. With presets, --preset NAME sets the defaults first.
    --config PATH reads flags from a JSON or YAML file (read_config_file), so a value comes from, last
    one winning: the default, the preset, the file (which may name the preset), the command line.
    dashes: spell field `a_b` as --a-b (the benchmarks) instead of --a_b."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert "config" not in fields, "--config is parse_args' own flag"
    argv = list(sys.argv[1:] if argv is None else argv)
    early = build_parser(fields, description, dashes, final=False)  # finds --config and --preset
    config_file = early.parse_known_args(argv)[0].config
    from_file, unset = config_file_argv(config_file, fields, dashes, early.prog) if config_file else ([], {})
    argv = from_file + argv  # the command line after the file: its flags win
    parser = build_parser(fields, description, dashes)
    if presets:
        preset = early.parse_known_args(argv)[0].preset
        if preset not in presets:
            parser.error(f"unknown --preset {preset!r}; choose from {', '.join(presets)}")
        parser.set_defaults(**presets[preset])
    parser.set_defaults(**unset)  # the file's nulls, over the preset
    values = vars(parser.parse_args(argv))
    del values["config"]
    return cls(**values)


def build_parser(fields, description=None, dashes=False, final=True):
    """The parser of the flags of `fields` ({name: dataclasses.Field}) and --config. final=False: one
    with no --help and no required flag, to read --config and --preset before the file's flags are in."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter, add_help=final)
    for f in fields.values():
        kw = dict(f.metadata)
        if kw.get("required"):
            kw["default"] = argparse.SUPPRESS  # no default to show
            kw["required"] = final
        else:
            kw["default"] = list(f.default) if isinstance(f.default, tuple) else f.default  # nargs gives lists
        if isinstance(f.default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif f.default is not None and "nargs" not in kw:
            kw.setdefault("type", type(f.default))
        parser.add_argument(flag_name(f.name, dashes), **kw)
    parser.add_argument("--config", metavar="PATH", help="a JSON or YAML (.yaml, .yml; pip install pyyaml) file "
                        "of flags, {\"flag_name\": value}, e.g. a train.py job's OUT/job.json; flags given here "
                        "override it, and it overrides --preset")
    return parser


def flag_name(name, dashes=False):
    return "--" + (name.replace("_", "-") if dashes else name)


def read_config_file(path, script):
    """The {flag name: value} of a --config file: JSON, or YAML for a name ending in .yaml / .yml."""
    yaml_file = path.lower().endswith((".yaml", ".yml"))
    if yaml_file:
        try:
            import yaml  # an optional dependency: only YAML files need it
        except ImportError:
            fail(script, f"--config {path} is a YAML file: reading it needs PyYAML (pip install pyyaml), "
                         f"or give the flags as JSON")
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) if yaml_file else json.load(f)
    except OSError as e:
        fail(script, f"cannot read --config {path}: {e.strerror}")
    except Exception as e:  # JSONDecodeError, UnicodeDecodeError, yaml.YAMLError
        fail(script, f"--config {path} is not valid {'YAML' if yaml_file else 'JSON'}: {' '.join(str(e).split())}")
    if not isinstance(values, dict):
        fail(script, f"--config {path} must hold an object of flags, {{\"flag_name\": value, ...}}")
    return values


def config_file_argv(path, fields, dashes, script):
    """The flags of a --config file as command-line arguments (argparse converts and checks them as
    if typed), and {name: value} for its nulls and empty lists (argparse cannot take those)."""
    values = {k.replace("-", "_"): v for k, v in read_config_file(path, script).items()}
    unknown = [k for k in values if k not in fields]
    if unknown:
        fail(script, f"--config {path}: unknown flag{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))} "
                     f"(the keys are the flag names of --help, without the leading --)")
    argv, unset = [], {}
    for name, value in values.items():
        option, kw = flag_name(name, dashes), fields[name].metadata
        many = "nargs" in kw or kw.get("action") == "append"
        if value is None and (fields[name].default is not None or kw.get("required")):
            fail(script, f"--config {path}: {name} needs a value, got null")
        elif value is None or (value == [] and many and not kw.get("required")):  # argparse takes neither
            unset[name] = value
        elif isinstance(fields[name].default, bool):
            if not isinstance(value, bool):
                fail(script, f"--config {path}: {name} must be true or false, got {value!r}")
            argv.append(option if value else "--no-" + option[2:])
        elif many != isinstance(value, list) or isinstance(value, dict) or \
                (many and any(isinstance(v, (list, dict)) for v in value)):
            fail(script, f"--config {path}: {name} must be {'a list of values' if many else 'one value'}, "
                         f"got {value!r}")
        elif kw.get("action") == "append":
            argv += [f"{option}={v}" for v in value]
        elif many:
            argv += [option, *map(str, value)]
        else:
            argv.append(f"{option}={value}")  # =: a value such as -1 is not taken for a flag
    return argv, unset


def command_line(cfg, script):
    """`python SCRIPT --flag=value ...` with the flags of cfg (a dataclass of a script's flags, one
    value each, or a list for --reward_fn and the like) whose values differ from the defaults: the
    command that parses into cfg."""
    flags = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value == f.default or (isinstance(value, list) and value == list(f.default or ())):
            continue
        if isinstance(value, list):
            flags += [f"--{f.name}", *map(str, value)]
        elif isinstance(value, bool):
            flags.append(f"--{f.name}" if value else f"--no-{f.name}")
        else:
            flags.append(f"--{f.name}={value}")
    return " ".join(["python", script] + [shlex.quote(flag) for flag in flags])


def user_error(script, message):
    """Report a user error as argparse does, on one line of stderr: `SCRIPT: error: MESSAGE`.
    Returns the exit status of a user error, 2."""
    print(f"{script}: error: {message}", file=sys.stderr)
    return 2


def fail(script, message):
    """A user error that ends the script: user_error, then exit status 2, no traceback."""
    sys.exit(user_error(script, message))
