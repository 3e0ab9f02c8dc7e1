"""Calibration statistics: for each layer, the second moment of the attention input (after the
input RMSNorm), accumulated in float64 over calibration windows, with a constant-1 feature appended
so that projection biases are covered: Sigma = sum_t [x_t; 1][x_t; 1]^T, shape (C+1, C+1)."""

from __future__ import annotations

import torch

from ..models import MEAForCausalLM


@torch.no_grad()
def input_moments(model: MEAForCausalLM, windows: torch.Tensor, *, batch_size: int = 4) -> list[torch.Tensor]:
    """Per-layer (C+1, C+1) moments of the attention inputs over the calibration windows."""
    layers = model.model.layers
    moments = [torch.zeros(model.config.hidden_size + 1, model.config.hidden_size + 1, dtype=torch.float64)
               for _ in layers]

    def hook(idx):
        def fn(module, args, kwargs):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            x1 = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
            moments[idx] += x1.T @ x1
        return fn

    handles = [layer.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        model.eval()
        for start in range(0, windows.shape[0], batch_size):
            model(input_ids=windows[start : start + batch_size].to(model.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return moments
