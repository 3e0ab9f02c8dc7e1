"""Attention kernels. Training, prefill and decoding go through `scaled_dot_product_attention`
(FlashAttention / efficient kernels where the hardware has them); only the QK-norm path of the
compressed cache, whose per-token logit scale SDPA cannot take, uses two plain matmuls.

Shapes: B batch, T query length, S key length, N query heads (n_q), H composite KV heads (h),
M component heads (h'), D head size. Query head i reads composite head G(i) = i // (N / H).

* `expanded_attention`: training and prefill; keys/values already mixed to H heads.
* `grouped_attention`: decoding from an H-head cache without HLC (plain GQA), each KV head read once.
* `absorbed_attention`: decoding from the compressed cache of M component heads. The score of query
  head i is  q_i . sum_m W^K[m, G(i)] k_m(t)  =  (q_i scaled block-wise by W^K[:, G(i)]) . concat_m k_m(t),
  i.e. one multi-query attention over the (M*D)-wide concatenated cache; values likewise, followed
  by a per-head recombination with W^V. The cache is read once; no H-head tensor over S is built.
  The finer mixings of `ops.mixing` (complex per RoPE pair for keys, a latent of any width for values)
  change only the query map before and the value map after that one read.

Both decode kernels also read a quantized cache (`ops.kvquant.QuantizedTokens`): `decode_blocks` folds the
scales into the queries (keys) and the attention probabilities (values). Keys are read by a fused C++ kernel
(`ops.fused_keys`) where it builds, else `DEQUANT_BLOCK` tokens of codes at a time; values by the same
extension straight from the stored planes, else torch's packed int4 matmul or a block at a time. The
temporary full-precision memory is at most one block of codes, never the whole cache.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..precision import cpu_capability
from . import fused_keys
from .kvquant import VALUE_PLANE, QuantizedTokens, from_planes, pack
from .mixing import absorb_query, mix, read_values


def expanded_attention(
    q_BTND: torch.Tensor,
    k_BSHD: torch.Tensor,
    v_BSHD: torch.Tensor,
    *,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Causal GQA over keys of the same sequence. mask: bool (B, 1, T, S) or None (plain causal)."""
    num_heads, num_kv = q_BTND.shape[2], k_BSHD.shape[2]
    q, k, v = q_BTND.transpose(1, 2), k_BSHD.transpose(1, 2), v_BSHD.transpose(1, 2)  # (B, heads, len, D)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1, scale=scale,
        enable_gqa=num_heads != num_kv,
    )
    return out.transpose(1, 2)  # (B, T, N, D)


def _rows_mask(mask: torch.Tensor | None, rows_per_query: int) -> torch.Tensor | None:
    """(B, 1, T, S) -> (B, 1, T * rows_per_query, S), rows ordered (t, head)."""
    if mask is None:
        return None
    b, _, t, s = mask.shape
    return mask[:, :, :, None, :].expand(b, 1, t, rows_per_query, s).reshape(b, 1, t * rows_per_query, s)


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
SPLIT_MIN_KEYS = 1024  # keys per chunk, at least, when a decode step is split over the context


def decode_splits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None) -> int:
    """How many chunks of the keys `decode_sdpa` attends to in parallel for these inputs; 1 means one plain
    SDPA call (a mask, gradients, another device, a short cache, values wider than keys, or no CPU flash
    kernel in this torch build)."""
    b, g, _, e = q.shape
    splits = min(-(-4 * torch.get_num_threads() // (b * g)), k.shape[2] // SPLIT_MIN_KEYS)
    if (_FLASH_CPU is None or q.device.type != "cpu" or mask is not None or splits < 2 or v.shape[-1] != e
            or (torch.is_grad_enabled() and q.requires_grad)):
        return 1
    return splits


def decode_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None,
                scale: float) -> torch.Tensor:
    """SDPA of a few query rows over a long cache, (B, G, R, E) x (B, G, S, E) -> (B, G, R, E).

    The fused CPU kernel parallelises over batch x heads only, so a decode step at batch 1 over one wide
    head (the compressed cache) or a few KV heads leaves cores idle. Without a mask and gradients, on CPU,
    the keys are split into chunks that run in parallel and the partial results are merged by their
    log-sum-exp ("flash-decoding"): out = sum_j softmax_j(lse_j) out_j, exact up to rounding. Which path
    runs: `decode_splits`."""
    b, g, r, e = q.shape
    s = k.shape[2]
    splits = decode_splits(q, k, v, mask=mask)
    if splits == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    chunk = s // splits
    main = chunk * splits
    out = []
    for i in range(b):  # b * g < 4 * threads here: a short loop
        kk, vv = (x[i, :, :main].unflatten(1, (splits, chunk)) for x in (k, v))  # (G, splits, chunk, E) views
        o, lse = _FLASH_CPU(q[i, :, None].expand(g, splits, r, e), kk, vv, scale=scale)[:2]  # (G, splits, R, *)
        if main < s:  # the last s - main keys
            ot, lt = _FLASH_CPU(q[i, :, None], k[i, :, None, main:], v[i, :, None, main:], scale=scale)[:2]
            o, lse = torch.cat([o, ot], dim=1), torch.cat([lse, lt], dim=1)
        weights = torch.softmax(lse, dim=1).to(o.dtype)  # (G, splits, R)
        out.append((o * weights[..., None]).sum(dim=1))
    return torch.stack(out)


DEQUANT_BLOCK = 4096  # tokens of key codes converted at a time when decoding from a quantized cache
DEQUANT_BYTES = 1 << 20  # ... at most this many bytes of converted keys at a time (a buffer that stays in cache)
INT4PACK_GROUP = 64  # tokens per (unit) scale given to torch's packed int4 matmul when it reads value planes


@lru_cache(maxsize=1)
def int4pack_layout_matches() -> bool:
    """Whether this torch build packs int4 matrices for its CPU matmul (`_weight_int4pack_mm_for_cpu`) in the
    layout the cache stores value planes in (`ops.kvquant.to_planes`): checked once by packing a probe."""
    convert = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
    if convert is None or not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return False
    w = torch.randint(0, 16, (VALUE_PLANE, 2 * INT4PACK_GROUP), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    try:
        packed = convert(w, 1)
    except RuntimeError:
        return False
    return torch.equal(packed.flatten(), pack(w.t().to(torch.uint8).contiguous(), 4).flatten())


@lru_cache(maxsize=8)
def _unit_scales(groups: int, device: torch.device) -> torch.Tensor:
    """(groups, VALUE_PLANE, 2) bfloat16 scale 1 and zero 0: torch's int4 matmul dequantizes (c - 8) s + z, so
    these make it return the weighted sums of the centred codes c - 8 (the real scales are folded into the
    weights; centring keeps the two terms of s c + z from cancelling in bfloat16)."""
    return torch.tensor([1.0, 0.0], dtype=torch.bfloat16, device=device).expand(groups, VALUE_PLANE, 2).contiguous()


def _values_int4pack(p: torch.Tensor, v: QuantizedTokens, out: torch.Tensor) -> None:
    """out (B, G, R, E) float32 += p (B, G, R, Q) @ the Q quantized values, read by torch's packed int4 matmul:
    per token t and plane f, sum_t (p_t s_t) (c_t - m) + p_t (z_t + m s_t), where the matmul returns the first
    sum over centred nibbles (an 8-bit code c = 16 h + l, so c - 136 = 16 (h - 8) + (l - 8)) and m = 8 or 136."""
    b, g, r, q = p.shape
    nibbles, e = v.bits // 4, v.shape[3]
    groups = q // INT4PACK_GROUP
    units = _unit_scales(max(64, 1 << (groups - 1).bit_length()), p.device)[:groups]  # powers of two: few sizes
    for f in range(e // VALUE_PLANE):
        grp = f * VALUE_PLANE // v.group_size
        weights = (p * v.scale[:, :, :, grp].float()[:, :, None]).to(torch.bfloat16)  # (B, G, R, Q)
        for i in range(b):
            for h in range(g):
                acc = None
                for n in range(nibbles):
                    plane = v.codes[i, h, f * nibbles + n].view(VALUE_PLANE, q // 2)
                    y = torch._weight_int4pack_mm_for_cpu(weights[i, h], plane, INT4PACK_GROUP, units).float()
                    acc = y if acc is None else acc * 16 + y
                out[i, h, :, f * VALUE_PLANE : (f + 1) * VALUE_PLANE] += acc
    centre = 8 if v.bits == 4 else 136
    zero = torch.addcmul(v.zero.float(), v.scale.float(), torch.tensor(float(centre)))  # (B, G, Q, E/g)
    out += (p @ zero).repeat_interleave(v.group_size, dim=-1)


def _values_blocks(p: torch.Tensor, v: QuantizedTokens, out: torch.Tensor, block: int) -> None:
    """out (B, G, R, E) float32 += p (B, G, R, Q) @ the Q quantized values, converting `block` tokens of codes
    at a time; per-token scales folded into p."""
    b, g, r, q = p.shape
    ev, groups = v.shape[3], v.scale.shape[3]
    for a in range(0, q, block):
        z = min(a + block, q)
        codes = from_planes(v.codes[..., a:z, :], v.bits).float()  # (B, G, L, E)
        pb = p[..., a:z]
        weighted = (pb[..., None] * v.scale[:, :, a:z].float()[:, :, None]).permute(0, 1, 4, 2, 3)  # (B, G, E/g, R, L)
        per_group = weighted @ codes.view(b, g, z - a, groups, ev // groups).transpose(2, 3)  # (B, G, E/g, R, g)
        out += per_group.permute(0, 1, 3, 2, 4).reshape(b, g, r, ev)
    out += (p @ v.zero.float()).repeat_interleave(ev // groups, dim=-1)


KEY_READ_ENV = "MEA_KEY_READ"  # "auto" (default): the fused C++ read where it builds; "blocks": always the block read
KEY_READS = ("auto", "blocks")
VALUE_READ_ENV = "MEA_VALUE_READ"  # "auto" (default): fused C++, else torch's int4pack, else blocks; or one forced
VALUE_READS = ("auto", "int4pack", "blocks")


def _read_setting(env: str, choices: tuple[str, ...]) -> str:
    mode = os.environ.get(env, "auto")
    if mode not in choices:
        raise ValueError(f"{env} must be one of {', '.join(choices)}, got {mode!r}")
    return mode


def cpu_key_read() -> str:
    """How a CPU decode step without gradients reads quantized keys on this machine: "fused" where the C++
    kernel builds (`fused_keys.load`, tried once) and `MEA_KEY_READ` is unset or "auto", else "blocks"."""
    mode = _read_setting(KEY_READ_ENV, KEY_READS)
    return "fused" if mode == "auto" and fused_keys.load() is not None else "blocks"


def cpu_value_read() -> str:
    """How a CPU decode step without gradients reads quantized values on this machine (for layouts every read
    takes): "fused" where the C++ kernel builds and `MEA_VALUE_READ` is unset or "auto"; else "int4pack"
    (torch's packed int4 CPU matmul, in bfloat16, straight from the stored planes) on CPUs with native
    bfloat16 arithmetic (`precision.cpu_capability`) where the layout matches (`int4pack_layout_matches`),
    unless `MEA_VALUE_READ=blocks`; else "blocks"."""
    mode = _read_setting(VALUE_READ_ENV, VALUE_READS)
    if mode == "auto" and fused_keys.load() is not None:
        return "fused"
    if mode != "blocks" and cpu_capability()["cpu_native_bf16"] and int4pack_layout_matches():
        return "int4pack"
    return "blocks"


def quantized_value_read(v: QuantizedTokens, p: torch.Tensor) -> str:
    """How decoding reads quantized values, the one place that decides: on CPU without gradients, the read
    `cpu_value_read` names where the layout suits it -- "fused" (`ops.fused_keys.value_sums`) where one scale
    covers a plane (the group size a multiple of the plane width), "int4pack" for planes of 64 features with
    whole groups of `INT4PACK_GROUP` tokens; everything else, "blocks" (codes converted a block at a time)."""
    if (p.device.type != "cpu" or v.codes.device.type != "cpu" or not v.quantized
            or (torch.is_grad_enabled() and p.requires_grad)):
        return "blocks"
    read, width = cpu_value_read(), v.codes.shape[-1] * 2
    if read == "fused" and v.group_size % width == 0:
        return "fused"
    if (read == "int4pack" and width == VALUE_PLANE and v.group_size % VALUE_PLANE == 0
            and v.quantized % INT4PACK_GROUP == 0):
        return "int4pack"
    return "blocks"


def quantized_key_read(k: QuantizedTokens, q: torch.Tensor) -> str:
    """How decoding reads quantized keys, the one place that decides: "fused" (`ops.fused_keys`: the codes read
    inside the dot products by a C++ kernel compiled for this machine at first use) on CPU without gradients
    where `cpu_key_read` says so; else "blocks" (codes converted a block at a time, `_key_scores_blocks`). The
    environment variable `MEA_KEY_READ=blocks` forces the block read."""
    if q.device.type != "cpu" or k.codes.device.type != "cpu" or (torch.is_grad_enabled() and q.requires_grad):
        return "blocks"
    return cpu_key_read()


def _key_scores(q: torch.Tensor, k: QuantizedTokens, scores: torch.Tensor) -> None:
    """scores[..., :Q] = q . the Q quantized keys, read as `quantized_key_read` decides."""
    if quantized_key_read(k, q) == "fused":
        fused_keys.key_scores(q, k.codes, k.scale, k.zero, scores, bits=k.bits, group_size=k.group_size)
    else:
        _key_scores_blocks(q, k, scores)


def _key_scores_blocks(q: torch.Tensor, k: QuantizedTokens, scores: torch.Tensor) -> None:
    """scores[..., :Q] = q . the Q quantized keys, a block at a time: each block's codes are converted into one
    reused buffer, scaled per channel and group of tokens in place, and read by one matrix product."""
    b, g, r, e = q.shape
    n, size = k.quantized, k.group_size
    block = max(size, min(DEQUANT_BLOCK, DEQUANT_BYTES // (b * g * e * q.element_size())) // size * size)
    buf = q.new_empty((b, g, min(block, n), e))
    k_scale, k_zero = k.scale.to(q.dtype), k.zero.to(q.dtype)  # (B, G, Q/g, E)
    half = e // 2
    for a in range(0, n, block):
        z = min(a + block, n)
        x, codes = buf[:, :, : z - a], k.codes[:, :, a:z]
        if k.bits == 8:
            x.copy_(codes)
        else:  # `pack`: low nibbles hold the first half of the features, high nibbles the second
            x[..., :half].copy_(codes & 15)
            x[..., half:].copy_(codes >> 4)
        grouped = x.view(b, g, (z - a) // size, size, e)
        torch.addcmul(k_zero[:, :, a // size : z // size, None], grouped, k_scale[:, :, a // size : z // size, None],
                      out=grouped)
        scores[..., a:z] = q @ x.transpose(-1, -2)


def decode_blocks(q: torch.Tensor, k: QuantizedTokens, v: QuantizedTokens, *, mask: torch.Tensor | None, scale: float,
                  factor: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of (B, G, R, E) queries over (B, G, S, E) quantized keys/values, never building a
    full-precision copy of the cache. Keys (scaled per channel and group of tokens) are read by the fused C++
    kernel, or converted `DEQUANT_BLOCK` tokens at a time into one buffer and read by a matrix product
    (`_key_scores`; `quantized_key_read` decides). Values are
    scaled per token, so out = sum_t (p_t s_t) codes_t + p_t z_t with the scale folded into the attention
    probabilities: the fused C++ kernel reads the stored planes directly, else torch's packed int4 matmul (CPUs
    with native bfloat16), else blocks of codes are converted (`quantized_value_read` decides). The (B, G, R, S)
    logits are kept whole (R is a few query rows), so the softmax is exact. mask: bool (B, 1, R, S); factor: (B, 1, R, S)
    per-logit multipliers (QK-norm after mixing)."""
    b, g, r, e = q.shape
    s, n = k.shape[2], k.quantized
    scores = q.new_empty((b, g, r, s), dtype=torch.float32)
    if n:
        _key_scores(q, k, scores)
    if s > n:
        scores[..., n:] = q @ k.tail.transpose(-1, -2)
    scores *= scale
    if factor is not None:
        scores *= factor
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    p = torch.softmax(scores, dim=-1)  # (B, G, R, S) float32
    out = (p[..., n:].to(q.dtype) @ v.tail).float() if s > n else p.new_zeros((b, g, r, v.shape[3]))
    if n:
        read = quantized_value_read(v, p)
        if read == "fused":
            fused_keys.value_sums(p[..., :n], v.codes, v.scale, v.zero, out, bits=v.bits, group_size=v.group_size)
        elif read == "int4pack":
            _values_int4pack(p[..., :n], v, out)
        else:
            _values_blocks(p[..., :n], v, out, max(DEQUANT_BLOCK // k.group_size, 1) * k.group_size)
    return out.to(q.dtype)


def grouped_attention(
    q_BTND: torch.Tensor,
    k_BSHD: torch.Tensor,
    v_BSHD: torch.Tensor,
    *,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """GQA decode: the queries of each KV group become rows of one attention over that head. k, v: (B, S, H, D)
    views of a float cache, or `QuantizedTokens` of (B, H, S, D) read block by block."""
    b, t, n, d = q_BTND.shape
    quantized = isinstance(k_BSHD, QuantizedTokens)
    h, e = (k_BSHD.shape[1], v_BSHD.shape[3]) if quantized else (k_BSHD.shape[2], v_BSHD.shape[3])
    g = n // h  # values may be wider than keys (differential attention)
    q = q_BTND.reshape(b, t, h, g, d).permute(0, 2, 1, 3, 4).reshape(b, h, t * g, d)  # (B, H, T*g, D)
    if quantized:
        out = decode_blocks(q, k_BSHD, v_BSHD, mask=_rows_mask(mask, g), scale=scale)
    else:
        out = decode_sdpa(q, k_BSHD.transpose(1, 2), v_BSHD.transpose(1, 2), mask=_rows_mask(mask, g), scale=scale)
    return out.view(b, h, t, g, e).permute(0, 2, 1, 3, 4).reshape(b, t, n, e)


def absorbed_attention(
    q_BTND: torch.Tensor,
    k_BSMD: torch.Tensor,
    v_BSMF: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    *,
    mask: torch.Tensor | None,
    scale: float,
    k_scale_BSH: torch.Tensor | None = None,
    key_mixing: str = "head",
    value_mixing: str = "head",
) -> torch.Tensor:
    """Attention from the compressed cache. k: (B, S, M_K, D) key components (after RoPE); v: (B, S, M_V, D)
    value components or (B, S, 1, R) a value latent; w_k, w_v: their mixing weights (see `ops.mixing`);
    k_scale (B, S, H): optional per-token factor on composite keys (QK-norm after mixing). Returns (B, T, N, D).
    A quantized cache passes k, v as `QuantizedTokens` of (B, 1, S, M_K*D) and (B, 1, S, M_V*D or R), read
    block by block."""
    b, t, n, d = q_BTND.shape
    quantized = isinstance(k_BSMD, QuantizedTokens)
    s = k_BSMD.shape[2 if quantized else 1]
    h = k_scale_BSH.shape[2] if k_scale_BSH is not None else w_k.shape[1]
    q = absorb_query(q_BTND, w_k, key_mixing, h).reshape(b, 1, t * n, -1)  # rows (t, i)
    rows_mask = _rows_mask(mask, n)
    factor = None
    if k_scale_BSH is not None:  # a per-(key, head) logit factor, which SDPA cannot take
        factor = k_scale_BSH.repeat_interleave(n // h, dim=2).transpose(1, 2).to(q.dtype)  # (B, N, S)
        factor = factor[:, None, None].expand(b, 1, t, n, s).reshape(b, 1, t * n, s)
    if quantized:
        u = decode_blocks(q, k_BSMD, v_BSMF, mask=rows_mask, scale=scale, factor=factor)
        return read_values(u.view(b, t, n, -1), w_v, value_mixing, h, d)
    k = k_BSMD.reshape(b, 1, s, -1)  # concatenated components, a view of the cache
    v = v_BSMF.reshape(b, 1, s, -1)
    if factor is None:
        u = decode_sdpa(q, k, v, mask=rows_mask, scale=scale)
    else:  # two matmuls, each reading the cache once
        scores = (q @ k.transpose(-1, -2)) * (factor * scale)  # (B, 1, T*N, S)
        if rows_mask is not None:
            scores = scores.masked_fill(~rows_mask, float("-inf"))
        u = torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v
    return read_values(u.view(b, t, n, -1), w_v, value_mixing, h, d)


def attention_reference(q_BTND, k_BSHD, v_BSHD, *, mask, scale, causal_offset: int = 0):
    """Naive softmax attention with the KV heads repeated per group, in float64.
    mask: bool (B, 1, T, S) or None; None means causal with query t at absolute position offset + t."""
    b, t, n, _ = q_BTND.shape
    s, h = k_BSHD.shape[1], k_BSHD.shape[2]
    k = k_BSHD.double().repeat_interleave(n // h, dim=2)
    v = v_BSHD.double().repeat_interleave(n // h, dim=2)
    scores = torch.einsum("btnd,bsnd->bnts", q_BTND.double(), k) * scale
    if mask is None:
        mask = (torch.arange(s)[None, :] <= torch.arange(t)[:, None] + causal_offset)[None, None]
    scores = scores.masked_fill(~mask.to(scores.device), float("-inf"))
    return torch.einsum("bnts,bsnd->btnd", torch.softmax(scores, dim=-1), v).to(q_BTND.dtype)


def absorbed_attention_reference(q_BTND, k_BSMD, v_BSMF, w_k, w_v, *, mask, scale, k_scale_BSH=None,
                                 key_mixing="head", value_mixing="head"):
    """Reference for `absorbed_attention`: materialise the H composite heads, then plain attention."""
    k = mix(k_BSMD, w_k, key_mixing)
    if k_scale_BSH is not None:
        k = k * k_scale_BSH[..., None].to(k.dtype)
    return attention_reference(q_BTND, k, mix(v_BSMF, w_v, value_mixing), mask=mask, scale=scale,
                               causal_offset=k_BSMD.shape[1] - q_BTND.shape[1])
