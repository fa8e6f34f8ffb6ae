"""The CPU speed tricks of nanowarp/fast/ against their plain versions, where not tested beside their users:
the LM head's (W·hᵀ)ᵀ against hidden @ Wᵀ (matmul.linear is test_gpt2.py's, the fused log-prob and KL
test_logprobs.py's, the inverse-CDF draw test_sampling_distribution.py's)."""

import pytest
import torch

from nanowarp.fast.matmul import head_logits


@pytest.mark.parametrize("rows", [1, 16, 64])
def test_head_logits_are_the_plain_product(rows):
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(97, 24, generator=g, dtype=torch.float64)
    hidden = torch.randn(rows, 24, generator=g, dtype=torch.float64)
    plain = hidden @ weight.t()
    torch.testing.assert_close(head_logits(weight, hidden), plain, rtol=1e-12, atol=1e-12)
    out = torch.empty(97, rows, dtype=torch.float64)  # the (V, B) buffer a decoding loop reuses
    logits = head_logits(weight, hidden, out)
    torch.testing.assert_close(logits, plain, rtol=1e-12, atol=1e-12)
    assert logits.data_ptr() == out.data_ptr()  # written into the buffer, not a new tensor
