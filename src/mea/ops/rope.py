"""Rotary position embedding (Llama "rotate-half" layout) with the scalings Llama 3 and Qwen configs carry.

`rope_parameters` is the Hugging Face dict: {"rope_type", "rope_theta", and per type: "factor",
"low_freq_factor", "high_freq_factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
"attention_factor", "mscale", "mscale_all_dim", "truncate"}.

RoPE rotates every head by the same position-dependent rotation, so it commutes with any linear
mixing across heads: RoPE(sum_m a_m k_m) = sum_m a_m RoPE(k_m). MEA relies on this to cache
component heads after RoPE.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_inv_freq(rope_parameters: dict, head_dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) and the attention scaling applied to cos/sin."""
    rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_parameters.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported; rotate the whole head (remove the key)")
    base = float(rope_parameters.get("rope_theta", 10_000.0))
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope_type == "linear":
        return inv_freq / float(rope_parameters["factor"]), 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, rope_parameters), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(rope_parameters, head_dim, max_position_embeddings, base)
    return inv_freq, 1.0


def _llama3_inv_freq(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate smoothly between.
    factor, low, high = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
    old_len = float(p["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(p: dict, head_dim: int, max_pos: int, base: float) -> tuple[torch.Tensor, float]:
    # YaRN (Peng et al. 2023): blend interpolated and extrapolated frequencies by wavelength,
    # and scale attention by 0.1 ln(factor) + 1 (or the explicit attention_factor).
    original = p.get("original_max_position_embeddings") or max_pos
    factor = float(p["factor"]) if p.get("factor") is not None else max_pos / original

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = get_mscale(factor, p["mscale"]) / get_mscale(factor, p["mscale_all_dim"])
        else:
            attention_factor = get_mscale(factor)
    beta_fast, beta_slow = float(p.get("beta_fast") or 32), float(p.get("beta_slow") or 1)

    def correction_dim(num_rotations: float) -> float:
        return (head_dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq, float(attention_factor)


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, scaling: float, dtype: torch.dtype):
    """position_ids (B, T) -> cos, sin of shape (B, T, 1, head_dim), ready to broadcast over heads."""
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device, torch.float32)  # (B, T, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, d)
    return (emb.cos() * scaling).to(dtype)[:, :, None], (emb.sin() * scaling).to(dtype)[:, :, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Multiply every frequency pair (x_p, x_{p+d/2}) = x_p + i x_{p+d/2} by i: (-x_{p+d/2}, x_p)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x_BTHD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, T, H, d) by position; the two halves of each head form the (real, imag) pairs."""
    return x_BTHD * cos + rotate_half(x_BTHD) * sin


def apply_rope_reference(x_BTHD: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor, scaling: float):
    """Reference: pair feature p with p + d/2 as a complex number and multiply by e^{i pos theta_p}."""
    half = x_BTHD.shape[-1] // 2
    z = torch.complex(x_BTHD[..., :half].double(), x_BTHD[..., half:].double())
    angle = position_ids[..., None].double() * inv_freq.double()  # (B, T, d/2)
    z = z * torch.polar(torch.full_like(angle, scaling), angle)[:, :, None]
    return torch.cat((z.real, z.imag), dim=-1).to(x_BTHD.dtype)
