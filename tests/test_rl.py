"""The pieces of one RL run: RLOO advantages, the learning-rate schedule, and the EMA anchor of
the effective weights."""

import copy
import io

import pytest
import torch

from nanowarp.config import parse_args
from nanowarp.lora import add_lora, lora_modules
from nanowarp.models import load_theta
from nanowarp.models.gpt2 import GPT2, GPT2Config
from nanowarp.optim import lr_factor
from nanowarp.rl import ema_update, load_resources, rl_run, rloo_advantages

CONFIG = GPT2Config(vocab_size=53, n_positions=32, n_embd=16, n_layer=1, n_head=2)


def test_rloo_advantages_hand_example():
    # two prompts, k = 3: A_i = r_i - mean of the other two
    r = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    expected = torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5, 0 - 1.5, 0 - 1.5, 3 - 0.0])
    assert torch.allclose(rloo_advantages(r, 3), expected)


def test_rloo_advantages_sum_to_zero_per_prompt_and_k1_is_reinforce():
    r = torch.randn(12)
    assert torch.allclose(rloo_advantages(r, 4).view(3, 4).sum(1), torch.zeros(3), atol=1e-6)
    assert torch.equal(rloo_advantages(r, 1), r)


def test_lr_schedule_warms_up_then_decays_to_zero():
    f = [lr_factor(s, 4, 10) for s in range(10)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == 1.0 and f[-1] > 0 and all(a > b for a, b in zip(f[4:], f[5:]))
    assert lr_factor(10, 4, 10) == 0.0


def test_ema_anchor_is_the_ema_of_effective_weights_not_of_factors():
    torch.manual_seed(0)
    base = GPT2(CONFIG)
    anchor = copy.deepcopy(base).requires_grad_(False)
    policy = add_lora(copy.deepcopy(base), rank=2, alpha=2)
    mu = 0.3
    name, layer = lora_modules(policy)[0]
    W0 = layer.weight.detach().clone()
    history = []
    for _ in range(3):  # three "optimizer steps" with random factors
        with torch.no_grad():
            for _, m in lora_modules(policy):
                m.lora_A.normal_()
                m.lora_B.normal_()
        history.append((layer.lora_A.detach().clone(), layer.lora_B.detach().clone()))
        ema_update(anchor, policy, mu)
    expected = W0.clone()
    ema_A, ema_B = torch.zeros_like(history[0][0]), torch.zeros_like(history[0][1])
    for A, B in history:
        expected = (1 - mu) * expected + mu * (W0 + B @ A)
        ema_A, ema_B = (1 - mu) * ema_A + mu * A, (1 - mu) * ema_B + mu * B
    got = anchor.get_submodule(name).weight
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, W0 + ema_B @ ema_A, atol=1e-3)  # the EMA of the factors differs
    # weights without LoRA stay at θ_init
    assert torch.equal(anchor.transformer.wte.weight, base.transformer.wte.weight)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_run_resumed_from_any_saved_state_ends_where_the_run_never_stopped(job_flags, dtype):
    # what rl_run saves (training_state, through torch.save as the job writes it) is all it needs:
    # the LoRA factors, the anchor (its float32 master in bf16), AdamW, the schedule, every random
    # stream (sampling, prompt order, LoRA dropout) and the prompt queue
    cfg = parse_args(job_flags + ["--out_dir", "unused", "--steps", "3", "--save_every", "1", "--lora_dropout", "0.1",
                                  "--rloo_k", "2", "--dtype", dtype])
    resources, theta = load_resources(cfg), load_theta(cfg.policy)
    states, logged = [], []

    def save_state(state):
        buffer = io.BytesIO()
        torch.save(state, buffer)
        states.append(buffer.getvalue())

    whole = rl_run(theta, 0, 5, cfg, resources, log=logged.append, save_state=save_state)
    assert len(states) == 2  # after steps 1 and 2: not after the last
    for n, saved in enumerate(states, 1):
        resumed_log = []
        state = torch.load(io.BytesIO(saved), weights_only=False)
        resumed = rl_run(theta, 0, 5, cfg, resources, log=resumed_log.append, resume=state)
        assert all(torch.equal(whole[k], resumed[k]) for k in whole), f"resumed after step {n}"
        assert [r["loss"] for r in resumed_log] == [r["loss"] for r in logged[n:]]
