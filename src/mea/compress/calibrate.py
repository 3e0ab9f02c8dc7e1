"""Calibration statistics: for each layer, the second moment of the attention input (after the
input RMSNorm), accumulated in float64 over calibration windows, with a constant-1 feature appended
so that projection biases are covered: Sigma = sum_t [x_t; 1][x_t; 1]^T, shape (C+1, C+1). For layers
with QK-norm on the keys, also the moment the key error is measured on (`key_moments`)."""

from __future__ import annotations

import torch

from ..models import MEAForCausalLM
from ..ops import inverse_rms


@torch.no_grad()
def input_moments(model: MEAForCausalLM, windows: torch.Tensor, *, batch_size: int = 4) -> list[torch.Tensor]:
    """Per-layer (C+1, C+1) moments of the attention inputs over the calibration windows."""
    layers = model.model.layers
    moments = [torch.zeros(model.config.hidden_size + 1, model.config.hidden_size + 1, dtype=torch.float64)
               for _ in layers]

    def hook(idx):
        def fn(module, args, kwargs):
            add_input_moment(moments[idx], args[0])
        return fn

    _run_with_hooks(model, windows, {i: hook(i) for i in range(len(layers))}, batch_size)
    return moments


def add_input_moment(moment: torch.Tensor, x: torch.Tensor) -> None:
    """moment (C+1, C+1) += the moment of attention inputs x (..., C), on the CPU (where the factorisation reads it)."""
    x1 = _with_one(x)
    moment += (x1.T @ x1).cpu()


def _with_one(x: torch.Tensor) -> torch.Tensor:
    """(..., C) attention inputs -> (N, C+1) float64 rows with the constant-1 feature appended."""
    x = x.reshape(-1, x.shape[-1]).double()
    return torch.cat([x, torch.ones_like(x[:, :1])], dim=1)


def _run_with_hooks(model: MEAForCausalLM, windows: torch.Tensor, hooks: dict, batch_size: int) -> None:
    """Run the calibration windows through the model with forward pre-hooks on the attention of the layers
    in `hooks` (layer index -> hook); nothing runs when there are none."""
    handles = [model.model.layers[i].self_attn.register_forward_pre_hook(fn, with_kwargs=True)
               for i, fn in hooks.items()]
    try:
        if handles:
            model.eval()
            for start in range(0, windows.shape[0], batch_size):
                model(input_ids=windows[start : start + batch_size].to(model.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def key_moments(model: MEAForCausalLM, windows: torch.Tensor, *,
                batch_size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Per layer with QK-norm on its keys (Qwen3): what the key error is measured on. The norm divides
    composite key j of token t by its RMS, so its error counts with weight r_jt = 1/RMS(k_j(x_t))^2.
    Approximated as separable, r_jt ~ c_j s_t with s_t = mean_j r_jt: returns (the input moment
    weighted by s_t, (C+1, C+1); the per-head factors c_j = sum_t r_jt / sum_t s_t, (h,)). None for
    layers without QK-norm."""
    layers = model.model.layers
    sums: list[list | None] = [None] * len(layers)

    def hook(idx):
        def fn(module, args, kwargs):
            sums[idx] = add_key_sums(sums[idx], module, args[0])
        return fn

    _run_with_hooks(model, windows, {i: hook(i) for i, layer in enumerate(layers) if layer.self_attn.k_norm is not None},
                    batch_size)
    return [key_moment(acc) for acc in sums]


def add_key_sums(sums: list | None, attn, x: torch.Tensor) -> list:
    """The running sums of `key_moments` (None: none yet) plus those of attention inputs x (..., C) of `attn`."""
    k, _ = attn.composite_kv(x)  # (B, T, h, D), before the norm
    r = inverse_rms(k, attn.k_norm.eps).double().pow(2).reshape(-1, k.shape[2])  # (B*T, h)
    s = r.mean(dim=1)
    x1 = _with_one(x)
    if sums is None:
        sums = [torch.zeros(x1.shape[1], x1.shape[1], dtype=torch.float64),
                torch.zeros(r.shape[1], dtype=torch.float64), torch.zeros((), dtype=torch.float64)]
    sums[0] += ((x1 * s[:, None]).T @ x1).cpu()
    sums[1] += r.sum(dim=0).cpu()
    sums[2] += s.sum().cpu()
    return sums


def key_moment(sums: list | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A `key_moments` entry from its running sums."""
    return None if sums is None else (sums[0], sums[1] / sums[2])
