"""Batching variable-length token lists. GPT-2 prompts are padded on the left (generation
continues at the right edge); classifier inputs on the right (the head reads the first token)."""

import torch


def pad(seqs, pad_id, device, side):
    """List of token-id lists -> (ids, mask), both (B, T); mask is 1 for tokens, 0 for padding."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for r, s in enumerate(seqs):
        cols = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[r, cols] = torch.tensor(s, dtype=torch.long)
        mask[r, cols] = 1
    return ids.to(device), mask.to(device)


def left_pad(seqs, pad_id, device="cpu"):
    return pad(seqs, pad_id, device, "left")


def right_pad(seqs, pad_id, device="cpu"):
    return pad(seqs, pad_id, device, "right")
