"""What one RL run takes from its flags and passes on, in a second or less each: the prompts
load_resources loads (rendered, fitted, with their columns) and where it puts the reward; the prompt
order (each epoch a permutation), the columns the reward gets, the run's own random streams, the
LoRA flags, the loss it logs and the non-finite values that stop it; the bf16 anchor's AnchorLinear
and the anchor's shared and own weights."""

import dataclasses
import signal

import pytest
import torch

import nanowarp.optim
import nanowarp.rl
from conftest import chat_checkpoint
from nanowarp.config import parse_args
from nanowarp.data import DataError
from nanowarp.lora import add_lora, lora_modules, named_targets
from nanowarp.models import eos_ids, from_config, load_config, load_theta
from nanowarp.fast.matmul import linear
from nanowarp.prompts import load_prompt_dataset, max_prompt_tokens
from nanowarp.rl import build_anchor, build_policy, check_finite, load_resources, rl_run, rl_step
from nanowarp.run_state import AnchorLinear
from nanowarp.sampling import sample_micro_batches
from nanowarp.signals import Interrupted
from nanowarp.tokenizer import load_tokenizer
from test_prompt_datasets import TEMPLATE, write

ROWS = [{"text": "The soup tasted", "idx": 0}, {"text": "A film about", "idx": 1}, {"text": "My neighbour", "idx": 2}]


@pytest.fixture(scope="module")
def flags(tiny_gpt2_dir, tiny_reward_dir, tmp_path_factory):
    """A tiny run on ROWS (prompt key `text`, column `idx`): batch 2, 2 new tokens, rank 2."""
    path = write(tmp_path_factory.mktemp("rows") / "rows.jsonl", ROWS)
    return ["--policy", tiny_gpt2_dir, "--reward_model", tiny_reward_dir, "--prompts", path, "--prompt_key", "text",
            "--steps", "1", "--batch_size", "2", "--max_new_tokens", "2", "--lora_rank", "2", "--warmup", "0",
            "--device", "cpu"]


class Scored:
    """A reward (in place of Reward) that records what it is given and returns `value` for each row."""

    def __init__(self, value=None):
        self.value, self.calls = value, []

    def score(self, texts, finished, columns):
        rewards = torch.full((len(texts),), self.value) if self.value is not None else \
            torch.tensor([sum(map(ord, c)) % 7 / 7 for c in texts.completions])
        self.calls.append((list(texts.prompts), columns, rewards))
        return rewards, {"own": rewards * 2}


def run(flags, reward, seed=3, log=None, **resources):
    cfg = parse_args(flags)
    res = dataclasses.replace(load_resources(cfg), reward=reward, **resources)
    return rl_run(load_theta(cfg.policy), 0, seed, cfg, res, log=log or (lambda metrics: None))


# ---- load_resources -----------------------------------------------------------------------------

def test_load_resources_renders_fits_and_keys_the_prompts_as_the_flags_say(flags, tiny_gpt2_dir, tmp_path):
    chat = chat_checkpoint(tiny_gpt2_dir, str(tmp_path / "chat"), TEMPLATE)
    cfg = parse_args(flags + ["--policy", chat, "--chat_template", "--dtype", "bfloat16"])
    resources = load_resources(cfg)
    tokenizer = load_tokenizer(chat)
    max_tokens = max_prompt_tokens(load_config(chat).n_positions, 2)
    rendered = load_prompt_dataset(cfg.prompts, tokenizer, "text", template=chat, chat=True, max_tokens=max_tokens)
    assert resources.prompts == rendered.ids != load_prompt_dataset(cfg.prompts, tokenizer, "text").ids
    assert resources.columns == {"idx": [0, 1, 2]}
    assert resources.device == torch.device("cpu") and resources.eos_id == eos_ids(chat, load_config(chat))
    assert next(resources.reward.sources[0].model.parameters()).dtype == torch.bfloat16  # --dtype's


def test_load_resources_checks_every_prompt_against_the_context(flags, prepared_imdb_dir):
    long = flags + ["--max_new_tokens", "126"]  # the tiny GPT-2's 128 positions leave 2 for a prompt
    with pytest.raises(DataError, match=r"rows\.jsonl, line 1: the prompt has"):
        load_resources(parse_args(long))
    with pytest.raises(DataError, match=r"prompts_train\.npz, prompt 1: the prompt has"):
        load_resources(parse_args(long + ["--prompts", "", "--data", prepared_imdb_dir]))
    cut = load_resources(parse_args(long + ["--truncate_prompts", "left"]))
    assert max(len(p) for p in cut.prompts) == 2


# ---- rl_run -------------------------------------------------------------------------------------

def test_each_epoch_draws_every_prompt_once_and_the_reward_gets_their_columns(flags, tiny_gpt2_dir):
    reward = Scored()
    run(flags + ["--steps", "6", "--rloo_k", "1"], reward)
    texts = dict(zip(load_tokenizer(tiny_gpt2_dir).decode_batch(load_resources(parse_args(flags)).prompts), range(3)))
    drawn = []
    for prompts, columns, _ in reward.calls:
        assert columns["idx"] == [texts[p] for p in prompts]  # each row's own column
        drawn += columns["idx"]
    assert [sorted(drawn[i:i + 3]) for i in range(0, 12, 3)] == [[0, 1, 2]] * 4, drawn
    reward = Scored()
    run(flags + ["--steps", "1", "--batch_size", "4", "--rloo_k", "2"], reward)
    (prompts, columns, _), = reward.calls
    assert columns["idx"][0::2] == columns["idx"][1::2] and prompts[0::2] == prompts[1::2]  # k copies in a row


def test_a_run_samples_from_its_own_seeded_stream_and_draws_its_seeds_prompt_order(flags, monkeypatch):
    """Step 1 samples what the seed's own generator samples from θ_init (LoRA's B is 0); the same seed
    draws the same prompts, another seed others."""
    sampled = []

    def recording(*args, **kwargs):
        sampled.append((args, kwargs, sample_micro_batches(*args, **kwargs)))
        return sampled[-1][-1]

    monkeypatch.setattr(nanowarp.rl, "sample_micro_batches", recording)
    three = flags + ["--steps", "2", "--batch_size", "3", "--rloo_k", "1"]
    cfg = parse_args(three)
    run(three, Scored(), seed=5)
    (_, prompts, max_new, micro, _), kwargs, samples = sampled[0]
    dense = build_policy(load_theta(cfg.policy), load_config(cfg.policy), "cpu")
    again = sample_micro_batches(dense, prompts, max_new, micro, torch.Generator().manual_seed(5), **kwargs)
    assert torch.equal(again.tokens, samples.tokens)
    orders = {}
    for seed in (5, 5, 6):
        sampled.clear()
        run(three, Scored(), seed=seed)
        orders.setdefault(seed, []).append([args[1] for args, _, _ in sampled])
    assert orders[5][0] == orders[5][1] != orders[6][0]


def test_lora_flags_reach_the_policy(flags, monkeypatch):
    policies = []
    monkeypatch.setattr(nanowarp.rl, "add_lora", lambda *a, **k: policies.append(add_lora(*a, **k)) or policies[-1])
    run(flags + ["--lora_alpha", "8", "--lora_targets", "c_fc", "--gradient_checkpointing"], Scored())
    policy, = policies
    names = [name for name, _ in lora_modules(policy)]
    assert names == named_targets(policy, "c_fc") and all(name.endswith("c_fc") for name in names)
    assert [m.scale for _, m in lora_modules(policy)] == [4.0] * len(names)
    assert policy.gradient_checkpointing is True


def test_optimizer_flags_reach_the_optimizer(flags, monkeypatch):
    made = []
    monkeypatch.setattr(nanowarp.rl, "adamw", lambda *a: made.append(a) or nanowarp.optim.adamw(*a))
    run(flags + ["--lr", "0.02", "--weight_decay", "0.1", "--steps", "3", "--warmup", "1", "--optimizer", "momentum",
                 "--adam_beta1", "0.5", "--adam_beta2", "0.9", "--adam_epsilon", "1e-3"], Scored())
    (params, *settings), = made
    assert settings == [0.02, 0.1, 1, 3, "momentum", (0.5, 0.9), 1e-3]
    assert all(p.requires_grad for p in params) and len(params) == 2 * len(named_targets(from_config(
        load_config(flags[1])), "all"))


def test_the_logged_loss_of_the_first_step_is_the_objective(flags, monkeypatch):
    """At step 1 the policy is θ_init, as the anchor and the sampler: KL 0, the policy's log-probs
    are the sampler's, and the loss is −mean[A · Σ_k log π] with RLOO's A of the rewards."""
    sampled, logged = [], []
    monkeypatch.setattr(nanowarp.rl, "sample_micro_batches",
                        lambda *a, **k: sampled.append(sample_micro_batches(*a, **k)) or sampled[-1])
    reward = Scored()
    run(flags + ["--batch_size", "4", "--rloo_k", "2"], reward, log=logged.append)
    (samples,), (row,), ((_, _, rewards),) = sampled, logged, reward.calls
    lp = (samples.logprobs * samples.mask.float()).sum(1)
    r = rewards.view(-1, 2)
    adv = (r - r.flip(1)).view(-1)  # the leave-one-out baseline of a pair is the other one
    assert adv.abs().sum() > 0 and abs(row["kl"]) < 1e-5
    assert row["reward/own"] == pytest.approx(2 * rewards.mean().item())  # each source's part, logged
    assert row["loss"] == pytest.approx(-(adv * lp).mean().item(), rel=1e-4, abs=1e-6)


def test_each_step_is_one_rl_step_whose_phases_the_timers_read(flags, monkeypatch):
    """rl_run calls rl_step once a step; rl_step marks its four phases in order, and the logged timers are
    the times between the marks (time_update: everything after scoring)."""
    phases, logged = [], []

    def step(*args, clock, **kwargs):
        return rl_step(*args, clock=lambda phase: phases.append(phase) or clock(phase), **kwargs)
    monkeypatch.setattr(nanowarp.rl, "rl_step", step)
    run(flags + ["--steps", "2"], Scored(), log=logged.append)
    assert phases == ["sample", "score", "anchor", "policy"] * 2 and [r["step"] for r in logged] == [1, 2]
    for r in logged:
        parts = [r[f"time_{p}"] for p in ("anchor", "policy", "optimizer", "ema")]
        assert min(parts + [r["time_sample"], r["time_score"]]) >= 0
        assert r["time_update"] == pytest.approx(sum(parts), rel=1e-6, abs=1e-9)


def test_completions_and_states_are_kept_every_so_many_steps(flags):
    """--log_completions 3 and --save_every 3 over 5 steps: the completions of step 3 are shown, the state
    after step 3 is saved (never after the last step)."""
    cfg = parse_args(flags + ["--steps", "5", "--rloo_k", "1", "--log_completions", "3", "--save_every", "3"])
    shown, saved = [], []
    resources = dataclasses.replace(load_resources(cfg), reward=Scored())
    rl_run(load_theta(cfg.policy), 0, 3, cfg, resources, log_completions=lambda step, rows: shown.append(step),
           save_state=lambda state: saved.append(state["step"]))
    assert shown == [3] and saved == [3]


@pytest.mark.parametrize("steps, stop_from, stopped_at", [(3, 1, 1), (2, 1, 1), (2, 2, None)])
def test_a_stop_request_ends_the_run_after_its_step_with_its_state_saved(flags, monkeypatch, steps, stop_from,
                                                                          stopped_at):
    """SIGTERM asked for during step `stop_from`: the run saves its state and raises Interrupted after that
    step, unless it was the last one (then the run just ends)."""
    done = []
    monkeypatch.setattr(nanowarp.rl, "stop_requested", lambda: signal.SIGTERM if len(done) >= stop_from else 0)
    cfg = parse_args(flags + ["--steps", str(steps), "--rloo_k", "1", "--save_every", "10"])
    resources = dataclasses.replace(load_resources(cfg), reward=Scored())
    saved = []
    args = (load_theta(cfg.policy), 0, 3, cfg, resources, done.append, None, lambda state: saved.append(state["step"]))
    if stopped_at is None:
        rl_run(*args)
        assert saved == [] and len(done) == steps
    else:
        with pytest.raises(Interrupted) as stopped:
            rl_run(*args)
        assert (stopped.value.signum, stopped.value.step) == (signal.SIGTERM, stopped_at) and saved == [stopped_at]


def test_a_bf16_run_returns_theta_init_in_float32_plus_its_lora_update(flags, monkeypatch):
    policies = []
    monkeypatch.setattr(nanowarp.rl, "add_lora", lambda *a, **k: policies.append(add_lora(*a, **k)) or policies[-1])
    cfg = parse_args(flags + ["--dtype", "bfloat16", "--lr", "0.05", "--lora_targets", "c_fc"])
    theta = load_theta(cfg.policy)
    got = run(flags + ["--dtype", "bfloat16", "--lr", "0.05", "--lora_targets", "c_fc"], Scored())
    policy, = policies
    delta = policy.hf_state_dict({f"{name}.weight": m.delta_weight().detach() for name, m in lora_modules(policy)})
    assert delta and set(delta) < set(theta) and all(got[k].dtype == torch.float32 for k in got)
    for k in theta:
        assert torch.equal(got[k], theta[k].float() + delta[k] if k in delta else theta[k].float()), k
    assert all(delta[k].abs().max() > 0 for k in delta)


@pytest.mark.parametrize("value, name", [(float("nan"), "reward"), (3e38, "loss"), (1e25, "gradient")])
def test_a_non_finite_value_stops_the_run_naming_it_and_the_step(flags, value, name):
    with pytest.raises(FloatingPointError, match=rf"^non-finite {name} at step 1: stopping this run \(lower --lr, "
                                                 r"or set --grad_clip\)$"):
        run(flags + ["--rloo_k", "1"], Scored(value))


def test_check_finite_names_the_first_non_finite_value():
    check_finite(4, a=torch.ones(2), b=1.0)
    with pytest.raises(FloatingPointError, match=r"^non-finite b at step 4: stopping this run"):
        check_finite(4, a=torch.ones(2), b=torch.tensor([1.0, float("inf")]))


# ---- the anchor ---------------------------------------------------------------------------------

def test_anchor_linear_computes_with_w0_plus_delta_rounded_once_and_saves_no_delta(tiny_gpt2_dir):
    layer = torch.nn.Linear(8, 4).to(torch.bfloat16)
    torch.nn.init.normal_(layer.bias)
    delta = torch.randn(4, 8) * 0.1
    anchor = AnchorLinear(layer, delta)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    expected = linear(x, (layer.weight.float() + delta).to(torch.bfloat16), layer.bias)
    assert torch.equal(anchor(x), expected) and not torch.equal(anchor(x), linear(x, layer.weight, layer.bias))
    assert list(anchor.state_dict()) == ["weight", "bias"]


def test_an_anchor_moves_its_own_copies_of_the_adapted_weights_by_default(tiny_gpt2_dir):
    config = load_config(tiny_gpt2_dir)
    policy = add_lora(build_policy(load_theta(tiny_gpt2_dir), config, "cpu"), 2, 2.0, 0.0,
                      named_targets(from_config(config), "c_fc"))
    own = build_anchor(policy, config)
    shared = build_anchor(policy, config, moving=False)
    for name, module in lora_modules(policy):
        assert own.get_submodule(name).weight.data_ptr() != module.weight.data_ptr()
        assert torch.equal(own.get_submodule(name).weight, module.weight)
        assert shared.get_submodule(name).weight.data_ptr() == module.weight.data_ptr()
    assert own.transformer.wte.weight.data_ptr() == policy.transformer.wte.weight.data_ptr()
    assert not any(p.requires_grad for p in own.parameters())
