"""
(W·xᵀ)ᵀ for few rows: the product x·Wᵀ of a linear layer, in the orientation MKL runs faster when x
has a few dozen rows, as every decoding step's input has (one row per sequence). Plainly:
`F.linear(x, weight, bias)` (torch.nn.functional), the tests' reference.
"""

import torch
import torch.nn.functional as F

# With at most this many rows a linear layer on a CPU computes (W·xᵀ)ᵀ rather than x·Wᵀ: the same
# product, but MKL runs it 1.2x faster at 64 rows and 1.5x at 16 with GPT-2's shapes on two threads
# (equal at 8, slower past ~400 rows).
FEW_ROWS = 256


def linear(x, weight, bias=None):
    """F.linear(x, weight, bias), x (..., in); as (W·xᵀ)ᵀ for few rows on a CPU (see FEW_ROWS).
    The result is then a transposed view: (..., out) over memory laid out (out, rows), which is
    what the next linear's xᵀ wants."""
    rows = x.numel() // x.size(-1) if x.size(-1) else 0
    if x.device.type != "cpu" or not 0 < rows <= FEW_ROWS:
        return F.linear(x, weight, bias)
    xt = x.reshape(rows, x.size(-1)).t()
    y = torch.mm(weight, xt) if bias is None else torch.addmm(bias[:, None], weight, xt)
    return y.t().unflatten(0, x.shape[:-1])


def head_logits(weight, hidden, out=None):
    """hidden (B, C)·weightᵀ -> logits (B, V), taken as (W·hᵀ)ᵀ: with a few dozen rows MKL runs that
    orientation ~1.5x faster than h·Wᵀ on a CPU (measured with GPT-2's 50257 x 768 head), and the
    LM head is a third of a decoding step. out: an optional (V, B) buffer to write W·hᵀ into; the
    result is its transpose. Plainly: `hidden @ weight.t()`."""
    return torch.mm(weight, hidden.t(), out=out).t()
