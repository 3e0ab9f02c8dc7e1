"""AdamW with the usual decay split, and the paper's schedule: linear warmup, cosine decay to a floor."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, *, weight_decay: float, decay_all: bool = False) -> list[dict]:
    """Weight decay on the projection matrices only. Norm scales, biases, embeddings, HLC matrices and
    differential-attention lambdas are not decayed (unless `decay_all`): decaying the HLC toward zero
    would shrink every key/value head, and decay on gains fights the norms they follow."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plain = p.ndim < 2 or "embed_tokens" in name or name.endswith(("hlc_k", "hlc_v"))
        (no_decay if plain and not decay_all else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, *, total: int, warmup: int, floor: float) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, cfg) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    opt = torch.optim.AdamW(param_groups(model, weight_decay=cfg.weight_decay, decay_all=cfg.decay_all),
                            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total=cfg.steps, warmup=cfg.warmup_steps, floor=cfg.min_lr_ratio))
    return opt, sched
