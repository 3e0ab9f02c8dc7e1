"""Group-wise integer quantization of cached keys and values (KIVI: keys per channel, values per token).

Stored per tensor of S tokens laid out (B, G, S, E) (G storage heads, E features per token and head):

* keys, per channel: each run of `group_size` consecutive tokens shares, per feature, one scale and one zero
  point: scales (B, G, S/g, E). Key outliers sit in fixed channels, so a per-channel range keeps them
  from inflating the step of every other channel (KIVI, Liu et al. 2024).
* values, per token: each run of `group_size` consecutive features of one token shares a scale and a zero
  point: scales (B, G, S, E/g).

Codes are unsigned `bits`-bit integers (4 or 8). Key codes are token-major, two 4-bit codes per byte
(`pack`); value codes are stored as planes of 4-bit codes in torch's packed int4 CPU layout (`to_planes`), so
the decode read can hand them to its packed matmul. Scales and zero points are float16 (2 bytes each).
Asymmetric (min/max) quantization:

    s = (max - min) / (2^bits - 1),   z = min,   code = clamp(round((x - z) / s), 0, 2^bits - 1),   x^ = code s + z

with s and z rounded to float16 before the codes are taken, so the error of one element is at most
`error_bound`: s/2 + 2^-11 (|z| + max - min) (the second term is the float16 rounding of s and z; s is at
least float16's smallest normal number). Elements beyond float16's range (|x| > 65504) are not supported.
`quantize_*_reference` are the float64 readable versions the tests compare against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

KV_BITS = (4, 8)  # supported code widths
DEFAULT_GROUP_SIZE = 64  # tokens (keys) / features (values) per scale: see docs/kv-quantization.md
DEFAULT_RESIDUAL = 0  # recent tokens kept in full precision beyond the group being filled
SCALE_DTYPE = torch.float16  # scales and zero points
SCALE_BYTES = 2
FLOAT16_EPS = 2.0**-11  # unit roundoff of float16: the relative rounding of a stored scale or zero point
SCALE_FLOOR = torch.finfo(SCALE_DTYPE).tiny  # smallest stored scale (a constant group)


@dataclass(frozen=True)
class KVQuant:
    """How a cache quantizes: `bits` per code, `group_size` tokens (keys) / features (values) per scale,
    `residual` most recent tokens kept in full precision."""

    bits: int
    group_size: int
    residual: int

    def __post_init__(self):
        if self.bits not in KV_BITS:
            raise ValueError(f"mea_kv_bits must be one of {KV_BITS} (or None for a 16/32-bit cache), got {self.bits}")
        if self.group_size < 2 or self.group_size % 2:
            raise ValueError(f"mea_kv_group_size must be an even number >= 2, got {self.group_size}")
        if self.residual < 0:
            raise ValueError(f"mea_kv_residual (full-precision recent tokens) must be >= 0, got {self.residual}")

    @property
    def codes_per_byte(self) -> int:
        return 8 // self.bits

    @property
    def levels(self) -> int:
        return 2**self.bits - 1

    def value_group(self, features: int) -> int:
        """Features per value scale for values `features` wide: the group size, or where it does not divide
        the width (a value latent narrower than a group, e.g. 32 wide under groups of 64, or of another width)
        their largest common divisor, so every layer of a model with mixed widths quantizes (a smaller group:
        finer scales, more scale bytes)."""
        return math.gcd(self.group_size, features)

    def check_features(self, features: int, what: str, *, latent: bool = False) -> None:
        """Values are grouped along their features: head-wide values by the group size, which must divide
        head_dim; a value latent (`latent`) by `value_group` of its width, which must be even."""
        if features % self.group_size == 0 or (latent and self.value_group(features) % 2 == 0):
            return
        raise ValueError(f"mea_kv_group_size={self.group_size} must divide {what} ({features}); "
                         f"use a divisor such as {_divisor_near(features, self.group_size)}")

    def quantized_tokens(self, tokens: int) -> int:
        """Tokens held as codes when the cache has grown to `tokens` tokens: whole groups, the most recent
        `residual` (and the partial group before them) stay in full precision."""
        return max(0, (tokens - self.residual) // self.group_size * self.group_size)

    def code_bytes(self, features: int) -> int:
        """Bytes of one token's codes over `features` features."""
        return features // self.codes_per_byte

    def bytes(self, tokens: int, key_features: int, value_features: int, float_bytes: int) -> int:
        """Bytes held by `tokens` tokens of one storage head: codes and scales of the quantized tokens, the
        full-precision rest at `float_bytes` per element."""
        q = self.quantized_tokens(tokens)
        quantized = (q * (self.code_bytes(key_features) + self.code_bytes(value_features))
                     + 2 * SCALE_BYTES * (q // self.group_size * key_features
                                          + q * value_features // self.value_group(value_features)))
        return quantized + (tokens - q) * (key_features + value_features) * float_bytes

    def scale_bytes_per_token(self, key_features: int, value_features: int) -> float:
        """Bytes of scales and zero points per quantized token: one pair per group of g tokens and key feature,
        one per `value_group` of value features."""
        return 2 * SCALE_BYTES * (key_features / self.group_size + value_features / self.value_group(value_features))

    def bytes_per_token(self, key_features: int, value_features: int) -> float:
        """Bytes per quantized token (codes and scales), the long-context cost."""
        return (self.code_bytes(key_features) + self.code_bytes(value_features)
                + self.scale_bytes_per_token(key_features, value_features))


def group_size_for(head_dim: int) -> int:
    """The default group size, or its largest divisor that divides head_dim (small test models)."""
    return math.gcd(DEFAULT_GROUP_SIZE, head_dim)


def _divisor_near(n: int, g: int) -> int:
    divisors = [d for d in range(2, n + 1, 2) if n % d == 0]
    return min(divisors, key=lambda d: abs(d - g)) if divisors else n


# --- packing ---------------------------------------------------------------------------------------------

VALUE_PLANE = 64  # value features per plane: the block of output channels of torch's packed int4 CPU matmul


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (..., E) -> (..., E * bits / 8): 4-bit codes two per byte, byte j holding feature j (low
    nibble) and feature j + E/2 (high nibble), so unpacking writes two contiguous halves."""
    if bits == 8:
        return codes
    half = codes.shape[-1] // 2
    return codes[..., :half] | (codes[..., half:] << 4)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`: (..., E * bits / 8) uint8 -> (..., E) uint8."""
    if bits == 8:
        return packed
    return torch.cat((packed & 15, packed >> 4), dim=-1)


def value_plane_width(features: int) -> int:
    """Features per plane of stored value codes: `VALUE_PLANE`, or its largest divisor dividing `features`."""
    return math.gcd(VALUE_PLANE, features)


def to_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Value codes (B, G, S, E) uint8 -> planes (B, G, (E/W) * bits/4, S, W/2), W = `value_plane_width(E)`.

    Each block of W features is held as bits/4 planes of 4-bit codes (8-bit codes: the high nibbles, then the
    low ones), each plane token-major with byte j of a token holding features j and j + W/2 of the block. A
    plane of S tokens is then, byte for byte, torch's packed int4 CPU layout of the (W x S) matrix of those
    codes (`ops.attention.int4pack_layout_matches` checks this at run time), so `p @ V` reads it directly."""
    b, g, s, e = codes.shape
    w = value_plane_width(e)
    nibbles = [codes >> 4, codes & 15] if bits == 8 else [codes]
    planes = torch.stack([pack(n.view(b, g, s, e // w, w), 4) for n in nibbles], dim=4)  # (B, G, S, E/W, N, W/2)
    return planes.permute(0, 1, 3, 4, 2, 5).reshape(b, g, -1, s, w // 2).contiguous()


def from_planes(planes: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `to_planes`: (B, G, P, S, W/2) -> codes (B, G, S, E) uint8."""
    b, g, p, s, half = planes.shape
    n = bits // 4
    blocks = unpack(planes, 4).view(b, g, p // n, n, s, 2 * half)  # (B, G, E/W, N, S, W)
    codes = blocks[:, :, :, 0] if n == 1 else (blocks[:, :, :, 0] << 4) | blocks[:, :, :, 1]
    return codes.permute(0, 1, 3, 2, 4).reshape(b, g, s, -1)


# --- quantize / dequantize -------------------------------------------------------------------------------

def _scale_zero(lo: torch.Tensor, hi: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    return ((hi - lo) / levels).clamp(min=SCALE_FLOOR).to(SCALE_DTYPE), lo.to(SCALE_DTYPE)


def _codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, levels: int) -> torch.Tensor:
    return ((x - zero.float()) / scale.float()).round_().clamp_(0, levels).to(torch.uint8)


def quantize_keys(x_BGSE: torch.Tensor, bits: int, group_size: int):
    """Keys per channel: S a multiple of `group_size`. -> (packed codes (B, G, S, E*bits/8) uint8,
    scales (B, G, S/g, E), zero points (B, G, S/g, E))."""
    b, g, s, e = x_BGSE.shape
    levels = 2**bits - 1
    x = x_BGSE.float().view(b, g, s // group_size, group_size, e)  # (B, G, S/g, g, E)
    scale, zero = _scale_zero(x.amin(dim=3), x.amax(dim=3), levels)  # (B, G, S/g, E)
    codes = _codes(x, scale[:, :, :, None], zero[:, :, :, None], levels).view(b, g, s, e)
    return pack(codes, bits), scale, zero


def quantize_values(x_BGSE: torch.Tensor, bits: int, group_size: int):
    """Values per token: E a multiple of `group_size`. -> (codes as planes (B, G, P, S, W/2) uint8, see
    `to_planes`, scales (B, G, S, E/g), zero points (B, G, S, E/g))."""
    b, g, s, e = x_BGSE.shape
    levels = 2**bits - 1
    x = x_BGSE.float().view(b, g, s, e // group_size, group_size)  # (B, G, S, E/g, g)
    scale, zero = _scale_zero(x.amin(dim=4), x.amax(dim=4), levels)  # (B, G, S, E/g)
    codes = _codes(x, scale[..., None], zero[..., None], levels).view(b, g, s, e)
    return to_planes(codes, bits), scale, zero


def dequantize_keys(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """(B, G, S, E*bits/8) codes with (B, G, S/g, E) scales and zero points -> (B, G, S, E) in `dtype`."""
    codes = unpack(packed, bits)
    b, g, s, e = codes.shape
    n = scale.shape[2]
    x = codes.view(b, g, n, s // n, e).to(dtype)  # (B, G, S/g, g, E)
    return torch.addcmul(zero.to(dtype)[:, :, :, None], x, scale.to(dtype)[:, :, :, None]).view(b, g, s, e)


def dequantize_values(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """Codes as planes (B, G, P, S, W/2) with (B, G, S, E/g) scales and zero points -> (B, G, S, E) in `dtype`."""
    codes = from_planes(packed, bits)
    b, g, s, e = codes.shape
    n = scale.shape[3]
    x = codes.view(b, g, s, n, e // n).to(dtype)  # (B, G, S, E/g, g)
    return torch.addcmul(zero.to(dtype)[..., None], x, scale.to(dtype)[..., None]).view(b, g, s, e)


def error_bound(x_BGSE: torch.Tensor, bits: int, group_size: int, *, keys: bool) -> torch.Tensor:
    """The documented bound on |x - dequantize(quantize(x))| per element (float64): s/2 + 2^-11 (|z| + max - min)
    of the element's group, s = (max - min) / (2^bits - 1)."""
    b, g, s, e = x_BGSE.shape
    x = x_BGSE.double()
    grouped, dim = ((x.view(b, g, s // group_size, group_size, e), 3) if keys
                    else (x.view(b, g, s, e // group_size, group_size), 4))
    lo, hi = grouped.amin(dim=dim, keepdim=True), grouped.amax(dim=dim, keepdim=True)
    bound = ((hi - lo) / (2**bits - 1)).clamp(min=SCALE_FLOOR) / 2 + FLOAT16_EPS * (lo.abs() + hi - lo)
    return bound.expand_as(grouped).reshape(b, g, s, e)


def quantize_reference(x: torch.Tensor, bits: int, group_size: int, *, keys: bool) -> torch.Tensor:
    """Round trip in float64 without packing or reduced-precision scales: the float reference of the codes'
    rounding (the fast path differs only by the float16 rounding of s and z)."""
    b, g, s, e = x.shape
    x = x.double()
    grouped, dim = ((x.view(b, g, s // group_size, group_size, e), 3) if keys
                    else (x.view(b, g, s, e // group_size, group_size), 4))
    lo, hi = grouped.amin(dim=dim, keepdim=True), grouped.amax(dim=dim, keepdim=True)
    step = (hi - lo).clamp(min=1e-30) / (2**bits - 1)
    return (((grouped - lo) / step).round().clamp(0, 2**bits - 1) * step + lo).reshape(b, g, s, e)


# --- what the decode kernels read ------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantizedTokens:
    """S tokens of keys or values, (B, G, S, E), as a quantized cache holds them: the first Q tokens as codes
    with their scales (`per_channel`: keys; else values), the remaining S - Q in full precision (`tail`).
    Views of the cache's storage; `read` dequantizes one span at a time, so no full-precision copy of the
    whole cache is ever built by the decode kernels."""

    codes: torch.Tensor  # keys (B, G, Q, E*bits/8), values planes (B, G, P, Q, W/2) (`to_planes`); uint8
    scale: torch.Tensor  # (B, G, Q/g, E) keys, (B, G, Q, E/g) values; float16
    zero: torch.Tensor
    tail: torch.Tensor  # (B, G, S - Q, E), the cache's compute dtype
    bits: int
    group_size: int
    per_channel: bool

    @property
    def quantized(self) -> int:
        return self.codes.shape[-2]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        b, g, t, e = self.tail.shape
        return b, g, self.quantized + t, e

    @property
    def dtype(self) -> torch.dtype:
        return self.tail.dtype

    def read(self, start: int, end: int) -> torch.Tensor:
        """Tokens [start, end) in full precision, (B, G, end - start, E). A span inside the codes must start
        (and end, unless at Q) on a group boundary for keys."""
        q = self.quantized
        parts = []
        if start < q:
            parts.append(self._dequantize(start, min(end, q)))
        if end > q:
            parts.append(self.tail[:, :, max(start, q) - q : end - q])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def _dequantize(self, start: int, end: int) -> torch.Tensor:
        codes = self.codes[..., start:end, :]
        if self.per_channel:
            g = self.group_size
            assert start % g == 0 and end % g == 0, "key spans start and end on group boundaries"
            return dequantize_keys(codes, self.scale[:, :, start // g : end // g], self.zero[:, :, start // g : end // g],
                                   self.bits, self.dtype)
        return dequantize_values(codes, self.scale[:, :, start:end], self.zero[:, :, start:end], self.bits, self.dtype)

    def dequantize(self) -> torch.Tensor:
        """All S tokens in full precision (a reference, and what a plain attention layer reads)."""
        return self.read(0, self.shape[2])
