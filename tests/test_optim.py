"""nanowarp.optim.AdamW against torch.optim.AdamW: the same weights bit for bit after every step (with
weight decay, a warm-up schedule, a parameter without gradient), the same state_dict, either loading the
other's; and no import of torch._dynamo in a process that trains."""

import subprocess
import sys

import torch

from conftest import ROOT
from nanowarp.optim import AdamW, lr_factor


def params(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5, 3, generator=g)), torch.nn.Parameter(torch.randn(7, generator=g)),
            torch.nn.Parameter(torch.randn(2, generator=g))]


def train(opt_class, steps, state=None):
    """`steps` AdamW steps from params(0), or from a state this returned; the params and that state."""
    ps = params(0)
    opt = opt_class(ps, lr=3e-2, weight_decay=0.1)
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
