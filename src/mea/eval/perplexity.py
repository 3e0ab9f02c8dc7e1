"""Perplexity on fixed token windows; the default is the documented held-out Hamlet slice."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, *, batch_size: int = 4) -> dict:
    """exp(mean next-token NLL) over every position of every window (each window scored on its own)."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    model.eval()
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        targets = ids[:, 1:]
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                 reduction="sum").item()
        count += targets.numel()
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count}
