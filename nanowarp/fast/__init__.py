"""
CPU speed tricks, off the reading path: each is a named function that computes what a plain line of
PyTorch computes, with what it wins (measured on 2 CPU cores, docs/performance.md) and its plain
version, which the tests hold it to:

| trick                                  | wins                                             | plain version                                  |
|----------------------------------------|--------------------------------------------------|------------------------------------------------|
| logprobs.fused_token_logprobs          | 0.64x the time, 3% of the extra memory (64 x 148 tokens, gradient to hidden) | logprobs.token_logprobs: log_softmax(h·Wᵀ/τ).gather |
| logprobs.fused_sequence_kl             | never holds the (B, T, V) logits of two models   | logprobs.sequence_kl                           |
| sampling.inverse_cdf                   | 8 ms instead of 84 per 64-row GPT-2 decoding step | sampling.multinomial: torch.multinomial        |
| matmul.linear, matmul.head_logits      | (W·xᵀ)ᵀ: 1.2x at 64 rows, 1.5x at 16 (GPT-2's shapes) | F.linear(x, W), hidden @ W.t()             |

Nothing is imported here: each module is imported by the code that uses it.
"""
