"""Tests for nanowarp.sampling's draw of one token (sample_next, inverse_cdf, truncate): the two-level
inverse CDF against its weights (a χ² test), the top_k and top_p sets and their edges, the log-probs
returned, the probability buffer, a near-zero temperature and the defaults. The χ² test of whole
sampling runs, through a model, is test_sampling.py's."""

import pytest
import torch

from conftest import chi_square_critical
from nanowarp.fast.sampling import inverse_cdf
from nanowarp.sampling import multinomial, sample_next


def test_chi_square_critical_value_approximation():
    assert chi_square_critical(1) == pytest.approx(10.83, rel=0.05)
    assert chi_square_critical(10) == pytest.approx(29.59, rel=0.01)


@pytest.mark.parametrize("block", [3, 4, 16])
def test_two_level_inverse_cdf_draws_proportionally_to_the_weights(block):
    # 10 weights: blocks of 3 leave a last block of 1, of 4 one of 2; 16 is a single short block
    weights = torch.tensor([0.5, 0.0, 2.0, 1.0, 0.05, 3.0, 0.0, 0.7, 1.5, 0.25])
    n = 20000
    token = inverse_cdf(weights.expand(n, -1).contiguous(), torch.Generator().manual_seed(0), block=block)
    counts = torch.bincount(token, minlength=10).double()
    assert counts[weights == 0].sum() == 0
    expected = n * weights.double() / weights.sum()
    stat = ((counts - expected)[weights > 0] ** 2 / expected[weights > 0]).sum().item()
    assert stat < chi_square_critical(int((weights > 0).sum()) - 1)


def test_inverse_cdf_draws_what_the_plain_multinomial_draws():
    """The trick against the plain draw it replaces (sampling.multinomial, torch.multinomial): the two
    samples' counts come from one distribution (a two-sample χ² test), zero weights in neither."""
    weights = torch.tensor([0.5, 0.0, 2.0, 1.0, 0.05, 3.0, 0.0, 0.7, 1.5, 0.25] * 150)  # 1,500: two blocks
    n = 20000
    rows = weights.expand(n, -1).contiguous()
    fast = torch.bincount(inverse_cdf(rows, torch.Generator().manual_seed(0)), minlength=1500).double()
    plain = torch.bincount(multinomial(rows, torch.Generator().manual_seed(1)), minlength=1500).double()
    assert fast[weights == 0].sum() == 0 and plain[weights == 0].sum() == 0
    fast, plain = fast.view(150, 10).sum(0), plain.view(150, 10).sum(0)  # the 10 weights, pooled over repeats
    seen = (fast + plain) > 0
    stat = ((fast - plain)[seen] ** 2 / (fast + plain)[seen]).sum().item()  # equal sample sizes
    assert stat < chi_square_critical(int(seen.sum()) - 1)


def test_top_k_and_top_p_never_sample_outside_their_sets():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3000, 50, generator=g) * 2
    p = torch.softmax(logits.double(), -1)
    token, _ = sample_next(logits, top_k=5, generator=g)
    assert (p.gather(1, token[:, None]) >= p.topk(5, -1).values[:, -1:]).all()
    token, _ = sample_next(logits, top_p=0.7, generator=g)
    sorted_p = p.sort(-1, descending=True).values
    # the nucleus: the most likely tokens whose preceding mass is < 0.7
    n_keep = ((sorted_p.cumsum(-1) - sorted_p) < 0.7).sum(-1, keepdim=True)
    assert (p.gather(1, token[:, None]) >= sorted_p.gather(1, n_keep - 1)).all()
    assert (n_keep > 1).any() and (n_keep < 50).all()


def test_truncation_at_its_edges():
    """top_k = 1 is greedy; a top_k above the batch's rows (but not the vocabulary) keeps k tokens,
    one above the vocabulary all of them; a token whose preceding mass is exactly top_p is outside
    the nucleus."""
    from nanowarp.sampling import truncate
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 50, generator=g) * 2
    assert torch.equal(sample_next(logits, top_k=1, generator=g)[0], logits.argmax(-1))
    probs = torch.softmax(torch.randn(2, 10, generator=g), -1)
    assert ((truncate(probs, 5, 1.0) > 0).sum(-1) == 5).all()
    assert torch.equal(truncate(probs, 50, 1.0), probs)
    exact = torch.tensor([[0.125, 0.5, 0.125, 0.25]])  # binary fractions: every sum is exact
    assert torch.equal(truncate(exact, 0, 0.5), torch.tensor([[0.0, 0.5, 0.0, 0.0]]))
    assert torch.equal(truncate(exact, 0, 0.75), torch.tensor([[0.0, 0.5, 0.0, 0.25]]))


def test_by_default_every_token_can_be_drawn():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3000, 5, generator=g)
    token, _ = sample_next(logits, generator=g)  # temperature 1, no top_k, no top_p
    assert (token != logits.argmax(-1)).float().mean() > 0.3 and token.unique().numel() == 5


@pytest.mark.parametrize("temperature", [0.7, 2.0])
def test_returned_logprobs_ignore_truncation_and_use_the_temperature(temperature):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 50, generator=g) * 2
    token, logprob = sample_next(logits, temperature=temperature, top_k=3, top_p=0.9, generator=g)
    expected = torch.log_softmax(logits.double() / temperature, -1).gather(1, token[:, None]).squeeze(1)
    torch.testing.assert_close(logprob.double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_a_probability_buffer_changes_nothing_but_the_buffer(temperature):
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    original, buffer = logits.clone(), torch.empty(6, 50)
    a = sample_next(logits, temperature, generator=torch.Generator().manual_seed(1))
    b = sample_next(logits, temperature, generator=torch.Generator().manual_seed(1), probs_out=buffer)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(logits, original)


def test_near_zero_temperature_is_greedy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 50, generator=g) * 2
    token, logprob = sample_next(logits, temperature=1e-4, generator=g)
    assert torch.equal(token, logits.argmax(-1))
