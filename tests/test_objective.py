"""The RL objective pinned down: the gradient rl_run accumulates equals the one of the paper's
objective (SPEC §1) computed by hand in float64:

    r_β = r − β · Σ_k m_k · [log π_θ(y_k|x, y_<k) − log π_ema(y_k|x, y_<k)]      (no gradient)
    A   = r_β − b,   b = 0 (REINFORCE, k = 1) or the mean r_β of the prompt's k − 1 others (RLOO)
    L   = −mean over completions of A · Σ_k m_k · log π_θ(y_k|x, y_<k)

every log-prob at the sampling temperature, m_k = 1 up to and including the completion's first
EOS, and the EMA anchor after one step (1 − μ) W0 + μ (W0 + s·B1·A1), W0 + s·B·A being the policy's
effective weight. The reference is plain code (a float64 forward, log_softmax, gather),
independent of the fused log-prob and of the sampler's bookkeeping. Each test also checks that
the objective with one thing changed (the KL's sign, no baseline, no whitening, temperature 1, no
mask, the EMA rate) gives a different gradient: a mutant of any of them fails here.
"""

import dataclasses
import math

import pytest
import torch
from torch.func import functional_call

import nanowarp.rl
from nanowarp.config import parse_args
from nanowarp.lora import lora_modules
from nanowarp.models import from_config, load_theta
from nanowarp.rl import load_resources, rl_run

TEMPERATURE, BETA, MU = 0.7, 1.0, 0.3
EOS_IDS = list(range(60))  # many stop ids: the tiny random policy ends about half its completions


class Recorder:
    """What rl_run computed: its samples and rewards, and at every optimizer step the LoRA factors
    the step used and the gradient it accumulated (read before AdamW moves the factors)."""

    def __init__(self, monkeypatch):
        self.samples, self.rewards, self.steps, self.policy = [], [], [], None
        sample, add_lora, adamw = nanowarp.rl.sample_micro_batches, nanowarp.rl.add_lora, nanowarp.rl.adamw

        def record_sample(*args, **kwargs):
            self.samples.append(sample(*args, **kwargs))
            return self.samples[-1]

        def record_policy(*args, **kwargs):
            self.policy = add_lora(*args, **kwargs)
            return self.policy

        def record_steps(params, *args):
            opt, sched = adamw(params, *args)
            opt.register_step_pre_hook(lambda *_: self.steps.append(
                {n: (p.detach().clone(), p.grad.clone()) for n, p in self.policy.named_parameters() if p.requires_grad}))
            return opt, sched

        monkeypatch.setattr(nanowarp.rl, "sample_micro_batches", record_sample)
        monkeypatch.setattr(nanowarp.rl, "add_lora", record_policy)
        monkeypatch.setattr(nanowarp.rl, "adamw", record_steps)

    def score(self, texts, finished, columns):
        """The reward (in place of nanowarp.reward.Reward's): a number that varies with the completion's
        text, and 0.5 more if it ended."""
        r = torch.tensor([(sum(map(ord, t)) % 97) / 97.0 for t in texts.queries]) + 0.5 * finished.float()
        self.rewards.append(r)
        return r, {}


def eos_mask(tokens):
    """1 up to and including each row's first stop id, 0 after it (every token if there is none)."""
    is_eos = torch.isin(tokens, torch.tensor(EOS_IDS)).long()
    return (is_eos.cumsum(1) - is_eos == 0).double()


def reference_gradient(dense, scale, factors, anchor, sampled, rewards, k, whiten=False, kl_sign=1.0,
                       baseline=True, temperature=TEMPERATURE, masked=True, per_token=False):
    """∇ of L at the LoRA factors ({name: tensor}) in float64; dense: θ_init's float64 model, anchor:
    the anchor's adapted weights. The keyword arguments change one thing, for the negative checks."""
    params = {n: p.double().requires_grad_() for n, p in factors.items()}
    adapted = sorted({n.rsplit(".", 1)[0] for n in params})
    policy = {f"{m}.weight": dense.get_submodule(m).weight + scale * params[f"{m}.lora_B"] @ params[f"{m}.lora_A"]
              for m in adapted}
    ids = torch.cat([sampled.prompt, sampled.tokens], 1)
    attention = torch.cat([sampled.prompt_mask, torch.ones_like(sampled.tokens, dtype=torch.bool)], 1)
    P = sampled.prompt.size(1)

    def logprobs(weights):  # (B, N): log π(y_k | x, y_<k) at `temperature`
        logits = functional_call(dense, weights, (ids, attention))[:, P - 1:-1]
        return torch.log_softmax(logits / temperature, -1).gather(-1, sampled.tokens[..., None])[..., 0]

    mask = eos_mask(sampled.tokens) if masked else torch.ones(sampled.tokens.shape, dtype=torch.float64)
    lp = logprobs(policy)
    with torch.no_grad():
        token_kl = (lp - logprobs(anchor)) * mask
        kl = token_kl.sum(1)
    r_beta = rewards.double() - kl_sign * BETA * kl
    adv = r_beta
    if baseline and k > 1:
        r = r_beta.view(-1, k)
        adv = (r - (r.sum(1, keepdim=True) - r) / (k - 1)).view(-1)
    if whiten:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    if per_token:  # A_t = r − β · Σ_{j ≥ t} KL_j − the same baseline as above
        kl_from_t = token_kl.flip(1).cumsum(1).flip(1)
        adv = rewards.double()[:, None] - kl_sign * BETA * kl_from_t - (r_beta - adv)[:, None]
        (-(adv * lp * mask).sum(1).mean()).backward()
    else:
        (-(adv * (lp * mask).sum(1)).mean()).backward()
    return {n: p.grad for n, p in params.items()}


def ema_anchor(dense, scale, factors, mu=MU):
    """The anchor's adapted weights one EMA step from θ_init: (1 − μ) W0 + μ (W0 + s·B·A)."""
    adapted = sorted({n.rsplit(".", 1)[0] for n in factors})
    w0 = {m: dense.get_submodule(m).weight.detach() for m in adapted}
    return {f"{m}.weight": (1 - mu) * w0[m] + mu * (w0[m] + scale * factors[f"{m}.lora_B"].double()
                                                   @ factors[f"{m}.lora_A"].double()) for m in adapted}


def relative_error(got, want):
    return max(float((got[n].double() - want[n]).abs().max()) for n in want) / \
        max(float(w.abs().max()) for w in want.values())


@pytest.fixture(scope="module")
def base_flags(tiny_gpt2_dir, tiny_reward_dir, prepared_imdb_dir):
    return ["--policy", tiny_gpt2_dir, "--reward_model", tiny_reward_dir, "--data", prepared_imdb_dir,
            "--steps", "2", "--batch_size", "8", "--max_new_tokens", "6", "--lora_rank", "2", "--lr", "0.05",
            "--warmup", "0", "--temperature", str(TEMPERATURE), "--kl_coef", str(BETA), "--ema_rate", str(MU),
            "--device", "cpu"]


def two_steps(monkeypatch, flags):
    """Run two RL steps, recorded; returns (recorder, θ_init's float64 model, LoRA scale)."""
    cfg = parse_args(flags)
    recorder = Recorder(monkeypatch)
    resources = dataclasses.replace(load_resources(cfg), eos_id=EOS_IDS, reward=recorder)
    theta_init = load_theta(cfg.policy)
    rl_run(theta_init, 0, 3, cfg, resources)
    dense = from_config(resources.model_config).load_hf_state_dict(theta_init).double().requires_grad_(False)
    scale = lora_modules(recorder.policy)[0][1].scale
    return recorder, dense, scale


@pytest.mark.parametrize("k, whiten", [(1, False), (1, True), (4, False), (4, True)],
                         ids=["reinforce", "reinforce-whiten", "rloo", "rloo-whiten"])
def test_rl_step_gradient_is_the_papers_objective(monkeypatch, base_flags, k, whiten):
    rec, dense, scale = two_steps(monkeypatch, base_flags + ["--rloo_k", str(k)] + (["--whiten"] if whiten else []))
    assert len(rec.steps) == 2 and len(rec.samples) == 2
    finished = torch.cat([s.finished for s in rec.samples])
    assert finished.any() and not finished.all(), "the check needs finished and unfinished completions"
    for step in (0, 1):
        factors = {n: v for n, (v, _) in rec.steps[step].items()}
        grads = {n: g for n, (_, g) in rec.steps[step].items()}
        # the anchor: θ_init at step 1; one EMA step, with the factors that step 1 produced, at step 2
        anchor = ema_anchor(dense, scale, factors, mu=MU if step else 0.0)
        args = (dense, scale, factors, anchor, rec.samples[step], rec.rewards[step], k)
        assert relative_error(grads, reference_gradient(*args, whiten=whiten)) < 1e-4
        # one thing changed in the objective: the recorded gradient is far from it
        wrong = [dict(temperature=1.0), dict(masked=False)]
        if step == 1:  # the anchor has moved away from the policy: the KL term counts
            wrong += [dict(kl_sign=-1.0), dict(kl_sign=0.0)]
            wrong_anchor = ema_anchor(dense, scale, factors, mu=1 - MU)  # θ_ema ← μ θ_ema + (1 − μ) θ
            assert relative_error(grads, reference_gradient(dense, scale, factors, wrong_anchor, *args[4:],
                                                            whiten=whiten)) > 1e-2
        if k > 1:
            wrong.append(dict(baseline=False))
        wrong.append(dict(whiten=not whiten))
        for change in wrong:
            assert relative_error(grads, reference_gradient(*args, **{"whiten": whiten, **change})) > 1e-2, change


@pytest.mark.parametrize("k", [1, 4], ids=["reinforce", "rloo"])
def test_kl_per_token_charges_each_token_the_kl_from_it_on(monkeypatch, base_flags, k):
    rec, dense, scale = two_steps(monkeypatch, base_flags + ["--rloo_k", str(k), "--kl_per_token"])
    factors = {n: v for n, (v, _) in rec.steps[1].items()}
    grads = {n: g for n, (_, g) in rec.steps[1].items()}
    anchor = ema_anchor(dense, scale, factors)  # step 2: the anchor has moved away from the policy
    args = (dense, scale, factors, anchor, rec.samples[1], rec.rewards[1], k)
    assert relative_error(grads, reference_gradient(*args, per_token=True)) < 1e-4
    for change in (dict(per_token=False), dict(per_token=True, kl_sign=-1.0), dict(per_token=True, baseline=False)):
        if k > 1 or "baseline" not in change:
            assert relative_error(grads, reference_gradient(*args, **change)) > 1e-2, change


def test_the_logged_regularised_reward_is_the_reward_minus_beta_kl(monkeypatch, base_flags):
    """r_β of step 2 as rl_run logs it is r − β · KL, with a KL that is not 0 (the policy left the anchor)."""
    logged = []
    cfg = parse_args(base_flags + ["--rloo_k", "4"])
    recorder = Recorder(monkeypatch)
    resources = dataclasses.replace(load_resources(cfg), eos_id=EOS_IDS, reward=recorder)
    rl_run(load_theta(cfg.policy), 0, 3, cfg, resources, log=logged.append)
    first, second = logged
    assert abs(first["kl"]) < 1e-5  # the anchor starts at θ_init, where the policy is
    assert abs(second["kl"]) > 1e-3
    assert second["r_beta"] == pytest.approx(second["reward"] - BETA * second["kl"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("grad_clip", [0.0, 0.05])
def test_what_rl_run_logs_is_what_it_computed(monkeypatch, base_flags, grad_clip):
    """Every metric of a step against what the step drew and scored: the step number, the reward, the
    lengths and ends of its completions, the learning rate of the schedule, the gradient norm before
    clipping (the one the optimizer sees is clipped to --grad_clip), the time split, the throughput,
    and the completions shown every --log_completions steps."""
    from nanowarp.optim import lr_factor
    logged, shown = [], []
    cfg = parse_args(base_flags + ["--rloo_k", "2", "--grad_clip", str(grad_clip), "--log_completions", "2"])
    recorder = Recorder(monkeypatch)
    resources = dataclasses.replace(load_resources(cfg), eos_id=EOS_IDS, reward=recorder)
    rl_run(load_theta(cfg.policy), 0, 3, cfg, resources, log=logged.append,
           log_completions=lambda step, rows: shown.append((step, rows)))
    assert [row["step"] for row in logged] == [1, 2]
    for i, row in enumerate(logged):
        lengths, finished = recorder.samples[i].mask.sum(1).float(), recorder.samples[i].finished.float()
        assert row["reward"] == pytest.approx(recorder.rewards[i].mean().item(), rel=1e-6)
        assert row["length"] == pytest.approx(lengths.mean().item()) and row["finished"] == finished.mean().item()
        assert row["lr"] == pytest.approx(cfg.lr * lr_factor(i, cfg.warmup, cfg.steps))
        seen = torch.cat([g.flatten() for _, g in recorder.steps[i].values()]).norm().item()
        assert seen == pytest.approx(min(row["grad_norm"], grad_clip or math.inf), rel=1e-5)
        parts = [row[f"time_{part}"] for part in ("anchor", "policy", "optimizer", "ema")]
        assert min(parts) >= 0 and row["time_update"] == pytest.approx(sum(parts), abs=1e-6)
        total = row["time_sample"] + row["time_score"] + row["time_update"]
        assert min(row["time_sample"], row["time_score"]) >= 0
        assert row["tokens_per_s"] == pytest.approx(lengths.sum().item() / total, rel=1e-6)
    assert logged[0]["grad_norm"] > 0.05, "the clipped case must clip"
    (step, rows), = shown  # every 2 steps: step 2 only
    assert step == 2 and [r["reward"] for r in rows] == pytest.approx(recorder.rewards[1][::2].tolist())
