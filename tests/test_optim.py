"""nanowarp.optim.AdamW against torch.optim.AdamW: the same weights bit for bit after every step (with
weight decay, a warm-up schedule, a parameter without gradient, other betas and eps), the same state_dict,
either loading the other's; Momentum against torch.optim.SGD and a float64 computation; the flags that
choose them; and no import of torch._dynamo in a process that trains."""

import subprocess
import sys

import torch

from conftest import ROOT
import pytest

from nanowarp.config import parse_args, validate
from nanowarp.optim import AdamW, Momentum, adamw, lr_factor


def params(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5, 3, generator=g)), torch.nn.Parameter(torch.randn(7, generator=g)),
            torch.nn.Parameter(torch.randn(2, generator=g))]


def train(opt_class, steps, state=None, **settings):
    """`steps` AdamW steps from params(0), or from a state this returned; the params and that state."""
    ps = params(0)
    opt = opt_class(ps, **{"lr": 3e-2, "weight_decay": 0.1, **settings})
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 2, 6))
    if state:
        with torch.no_grad():
            for p, saved in zip(ps, state["params"]):
                p.copy_(saved)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
    for _ in range(steps):
        g = torch.Generator().manual_seed(sched.last_epoch)  # the step's gradients, resumed or not
        for p in ps[:2]:  # the last parameter never gets a gradient: AdamW leaves it alone
            p.grad = torch.randn(p.shape, generator=g) * 10 ** torch.randint(-3, 3, (), generator=g)
        opt.step()
        sched.step()
    return ps, dict(params=[p.detach().clone() for p in ps], opt=opt.state_dict(), sched=sched.state_dict())


def test_adamw_is_torchs_bit_for_bit():
    mine, ours = train(AdamW, 5)
    torchs, theirs = train(torch.optim.AdamW, 5)
    for a, b in zip(mine, torchs):
        assert torch.equal(a, b)
    assert ours["opt"]["state"].keys() == theirs["opt"]["state"].keys() == {0, 1}
    for i in (0, 1):
        for key, value in theirs["opt"]["state"][i].items():
            assert torch.equal(ours["opt"]["state"][i][key], value) and ours["opt"]["state"][i][key].dtype == value.dtype
    assert ours["sched"] == theirs["sched"]


def test_a_state_dict_of_either_resumes_in_the_other():
    whole, _ = train(torch.optim.AdamW, 5)
    _, torchs_state = train(torch.optim.AdamW, 3)
    _, my_state = train(AdamW, 3)
    for opt_class, state in ((AdamW, torchs_state), (torch.optim.AdamW, my_state)):
        resumed, _ = train(opt_class, 2, state)
        for a, b in zip(resumed, whole):
            assert torch.equal(a, b)


def test_training_does_not_import_the_compiler():
    code = ("import sys, torch\nfrom nanowarp.optim import adamw\np = [torch.nn.Parameter(torch.ones(3))]\n"
            "opt, sched = adamw(p, 1e-2, 0.1, 1, 3)\np[0].grad = torch.ones(3)\nopt.step(); sched.step(); opt.zero_grad()\n"
            "opt.load_state_dict(opt.state_dict())\nprint(any(m.startswith('torch._dynamo') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_adamw_takes_other_betas_and_eps_as_torchs_does():
    settings = dict(betas=(0.5, 0.9), eps=1e-3)
    for a, b in zip(train(AdamW, 5, **settings)[0], train(torch.optim.AdamW, 5, **settings)[0]):
        assert torch.equal(a, b)
    ps = params(0)
    opt, _ = adamw(ps, 1e-2, 0.0, 1, 3, "adamw", (0.5, 0.9), 1e-3)
    assert isinstance(opt, AdamW) and opt.param_groups[0]["betas"] == (0.5, 0.9) and opt.param_groups[0]["eps"] == 1e-3


def test_momentum_without_momentum_is_plain_sgd():
    mine, _ = train(Momentum, 5, weight_decay=0.0, beta1=0.0)
    torchs, _ = train(torch.optim.SGD, 5, weight_decay=0.0)
    for a, b in zip(mine, torchs):
        assert torch.equal(a, b)


def test_momentum_is_adam_without_its_second_moment():
    """p ← p · (1 − lr · λ) − lr · m / (1 − β1^t), m ← β1 m + (1 − β1) g, in float64 beside it."""
    beta1, lr, wd, steps = 0.8, 3e-2, 0.1, 5
    mine, state = train(Momentum, steps, beta1=beta1)
    expected = [p.detach().double() for p in params(0)]
    moments = [torch.zeros_like(p) for p in expected]
    for t in range(steps):
        g = torch.Generator().manual_seed(t)
        rate = lr * lr_factor(t, 2, 6)
        for p, m in zip(expected[:2], moments):
            grad = (torch.randn(p.shape, generator=g) * 10 ** torch.randint(-3, 3, (), generator=g)).double()
            m.mul_(beta1).add_(grad, alpha=1 - beta1)
            p.mul_(1 - rate * wd).sub_(rate * m / (1 - beta1 ** (t + 1)))
    for a, b in zip(mine, expected):
        torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-7)
    assert torch.equal(mine[2], params(0)[2])  # no gradient: untouched, weight decay included
    assert set(state["opt"]["state"][0]) == {"step", "exp_avg"}  # no second moment kept
    resumed, _ = train(Momentum, 2, train(Momentum, 3, beta1=beta1)[1], beta1=beta1)
    for a, b in zip(resumed, mine):
        assert torch.equal(a, b)


def test_the_optimizer_flags_reach_the_optimizer_and_bad_values_are_refused(tmp_path):
    ps = params(0)
    opt, _ = adamw(ps, 1e-2, 0.0, 1, 3, "momentum", (0.5, 0.999), 1e-8)
    assert type(opt) is Momentum and opt.param_groups[0]["betas"][0] == 0.5
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        adamw(ps, 1e-2, 0.0, 1, 3, "lion")
    cfg = parse_args(["--optimizer", "momentum", "--adam_beta1", "0.99", "--adam_beta2", "0.9", "--adam_epsilon", "1e-6"])
    assert (cfg.optimizer, cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon) == ("momentum", 0.99, 0.9, 1e-6)
    for name, bad in (("adam_beta1", "1.0"), ("adam_beta2", "-0.1"), ("adam_epsilon", "0")):
        with pytest.raises(ValueError, match="--adam_beta1 and --adam_beta2 must be in \\[0, 1\\), --adam_epsilon > 0"):
            validate(parse_args([f"--{name}", bad]))


def test_the_schedule_warms_up_then_decays_to_zero_by_hand():
    """lr_factor against its definition written out: (step + 1) / warmup while warming up, then
    (total − step) / (total − warmup) down to 0 at `total` and after; one step of decay when
    total − warmup is 1 (and none to divide by when it is 0)."""
    assert [lr_factor(s, 3, 10) for s in range(12)] == pytest.approx(
        [1 / 3, 2 / 3, 1.0, 1.0, 6 / 7, 5 / 7, 4 / 7, 3 / 7, 2 / 7, 1 / 7, 0.0, 0.0])
    assert [lr_factor(s, 3, 4) for s in (2, 3, 4, 5)] == [1.0, 1.0, 0.0, 0.0]
    assert [lr_factor(s, 2, 2) for s in (0, 1, 2)] == [0.5, 1.0, 0.0]
    assert [lr_factor(s, 0, 4) for s in (0, 2, 4)] == [1.0, 0.5, 0.0]  # no warm-up


@pytest.mark.parametrize("optimizer", ["adamw", "momentum"])
def test_adamw_builds_the_optimizer_and_schedule_it_is_given(optimizer):
    p = torch.nn.Parameter(torch.ones(3))
    opt, sched = adamw([p], 0.5, 0.25, 2, 6, optimizer, (0.8, 0.95), 1e-6)
    group = opt.param_groups[0]
    assert type(opt) is {"adamw": AdamW, "momentum": Momentum}[optimizer]
    assert group["weight_decay"] == 0.25 and group["betas"][0] == 0.8
    if optimizer == "adamw":
        assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-6
    lrs = []
    for _ in range(7):
        lrs.append(sched.get_last_lr()[0])
        p.grad = torch.ones(3)
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5 * lr_factor(s, 2, 6) for s in range(7)])
    assert lrs[-1] == 0.0 and lrs[1] == 0.5  # the peak after warm-up, 0 at the last step


def test_the_defaults_are_torchs_and_the_papers():
    """adamw() without an optimizer is AdamW with torch's betas and eps; AdamW's and Momentum's own
    defaults are torch.optim.AdamW's (weight decay 0.01, β1 0.9)."""
    p = torch.nn.Parameter(torch.ones(2))
    opt, _ = adamw([p], 1e-3, 0.0, 0, 10)
    assert type(opt) is AdamW and opt.param_groups[0]["betas"] == (0.9, 0.999) and opt.param_groups[0]["eps"] == 1e-8
    ours, theirs = AdamW([p], 1e-3).defaults, torch.optim.AdamW([p], 1e-3).defaults
    assert {k: ours[k] for k in ("weight_decay", "betas", "eps")} == {k: theirs[k] for k in ("weight_decay", "betas", "eps")}
    assert Momentum([p], 1e-3).defaults["weight_decay"] == 0.01 and Momentum([p], 1e-3).defaults["betas"][0] == 0.9
