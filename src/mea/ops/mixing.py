"""The three ways a layer rebuilds its h composite key/value heads from what it caches.

* "head" (the paper's HLC, keys and values): M component heads, one real weight per (component, head),
      K_j = sum_m W[m, j] K_m                                        W: (M, H)
* "rope_pair" (keys): M component heads, one complex weight per (component, head, frequency pair). RoPE
  multiplies pair p (features p and p + D/2 as real and imaginary parts) by e^{i theta_p t}; a complex
  weight per pair commutes with that exactly, so components are cached after RoPE as with "head":
      K_j[p] = sum_m c[m, j, p] K_m[p]                               W: (M, H, 2, D/2), c = W[..., 0, :] + i W[..., 1, :]
  In real form, with a = Re c and b = Im c repeated over both halves: K_j = sum_m a ⊙ K_m + b ⊙ rot(K_m),
  rot = `rotate_half` (multiplication by i).
* "latent" (values, no RoPE): one latent of any width R, read through a (R, D) map per head,
      V_j = c B_j                                                    W: (R, H, D)

Every kind has an absorbed decode that reads the cache once, as one multi-query head: the query of head i
is mapped onto the concatenated components (`absorb_query`: q ⊙ a - rot(q ⊙ b) per component for
"rope_pair", since q . rot(z) = -rot(q) . z), and the attention output over the cached values is mapped
back to D features per head (`read_values`).

Layouts: components are (B, T, M, D) tensors; a latent is (B, T, 1, R), one wide "head".
"""

from __future__ import annotations

import torch

from .hlc import fold_into_projection, init_hlc, mix_heads
from .rope import rotate_half

KEY_MIXINGS = ("head", "rope_pair")
VALUE_MIXINGS = ("head", "latent")


def mixing_shape(kind: str, components: int, num_heads: int, head_dim: int) -> tuple[int, ...]:
    """Shape of the mixing weights; `components` is M (heads) or R (latent width)."""
    if kind == "head":
        return (components, num_heads)
    if kind == "rope_pair":
        return (components, num_heads, 2, head_dim // 2)
    if kind == "latent":
        return (components, num_heads, head_dim)
    raise ValueError(f"unknown mixing {kind!r}; choose one of {sorted(set(KEY_MIXINGS + VALUE_MIXINGS))}")


def _pair_weights(w_MH2P: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary parts, each repeated over both halves of a head: (M, H, D) twice."""
    w = w_MH2P.to(dtype)
    return torch.cat([w[:, :, 0], w[:, :, 0]], dim=-1), torch.cat([w[:, :, 1], w[:, :, 1]], dim=-1)


def mix(x: torch.Tensor, w: torch.Tensor, kind: str) -> torch.Tensor:
    """Cached components (B, T, M, D) or latent (B, T, 1, R) -> composite heads (B, T, H, D), contiguous."""
    if kind == "head":
        return mix_heads(x, w)
    if kind == "rope_pair":
        a, b = _pair_weights(w, x.dtype)
        return torch.einsum("btmd,mhd->bthd", x, a) + torch.einsum("btmd,mhd->bthd", rotate_half(x), b)
    if kind == "latent":
        return torch.einsum("btr,rhd->bthd", x[:, :, 0], w.to(x.dtype))
    raise ValueError(f"unknown mixing {kind!r}")


def fold_mixing(weight: torch.Tensor, bias: torch.Tensor | None, w: torch.Tensor, kind: str, head_dim: int):
    """The mixing folded into the (width, C) projection that makes the components: returns the (H D, C)
    weight and (H D,) bias of the composite heads (mixing is linear, so it applies to every column)."""
    if kind == "head":
        return fold_into_projection(weight, bias, w, head_dim)
    width, c = weight.shape
    per = width if kind == "latent" else head_dim

    def fold(cols: torch.Tensor) -> torch.Tensor:  # (width, K) -> (H D, K)
        k = cols.shape[1]
        return mix(cols.T.reshape(1, k, width // per, per), w.to(cols.dtype), kind)[0].permute(1, 2, 0).reshape(-1, k)

    return fold(weight), (None if bias is None else fold(bias[:, None])[:, 0])


def absorb_query(q_BTND: torch.Tensor, w: torch.Tensor, kind: str, num_kv_heads: int) -> torch.Tensor:
    """Queries mapped onto the concatenated key components: (B, T, N, D) -> (B, T, N, M D), so that
    q_i . K_{G(i)} = absorb_query(q)_i . concat_m K_m  (G(i) = i // (N / H))."""
    b, t, n, d = q_BTND.shape
    g = n // num_kv_heads
    if kind == "head":
        w_NM = w.repeat_interleave(g, dim=1).T.to(q_BTND.dtype)  # (N, M): W[m, G(i)]
        return (q_BTND[:, :, :, None, :] * w_NM[:, :, None]).reshape(b, t, n, -1)
    if kind == "rope_pair":
        a, im = (x.repeat_interleave(g, dim=1).transpose(0, 1) for x in _pair_weights(w, q_BTND.dtype))  # (N, M, D)
        q = q_BTND[:, :, :, None, :]
        return (q * a - rotate_half(q * im)).reshape(b, t, n, -1)
    raise ValueError(f"keys mix by one of {KEY_MIXINGS}, got {kind!r}")


def read_values(u_BTNF: torch.Tensor, w: torch.Tensor, kind: str, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """Attention outputs over the cached values (B, T, N, F) -> per-head outputs (B, T, N, D)."""
    b, t, n, f = u_BTNF.shape
    g = n // num_kv_heads
    if kind == "head":
        w_NM = w.repeat_interleave(g, dim=1).T.to(u_BTNF.dtype)  # (N, M): W[m, G(i)]
        return (u_BTNF.view(b, t, n, f // head_dim, head_dim) * w_NM[:, :, None]).sum(dim=3)
    if kind == "latent":
        return torch.einsum("btnr,rnd->btnd", u_BTNF, w.repeat_interleave(g, dim=1).to(u_BTNF.dtype))
    raise ValueError(f"values mix by one of {VALUE_MIXINGS}, got {kind!r}")


def mix_pairs_reference(x_BTMD: torch.Tensor, w_MH2P: torch.Tensor) -> torch.Tensor:
    """Readable reference for "rope_pair": complex numbers, composite pair = sum_m c[m, j, p] z_m[p]."""
    half = x_BTMD.shape[-1] // 2
    z = torch.complex(x_BTMD[..., :half].double(), x_BTMD[..., half:].double())  # (B, T, M, P)
    c = torch.complex(w_MH2P[:, :, 0].double(), w_MH2P[:, :, 1].double())  # (M, H, P)
    out = (z[:, :, :, None] * c).sum(dim=2)  # (B, T, H, P)
    return torch.cat([out.real, out.imag], dim=-1).to(x_BTMD.dtype)


def init_mixing(kind: str, components: int, num_heads: int, head_dim: int, how: str | None = None) -> torch.Tensor:
    """Initial mixing weights of any kind (`ops.mixing`): the HLC init for "head"; for "rope_pair" the
    same real weights on every frequency pair; for "latent" (width R) composite feature (j, d) starts as
    latent feature (j D + d) mod R (the identity when R = h D)."""
    if kind == "head":
        return init_hlc(components, num_heads, how)
    if kind == "rope_pair":
        w = torch.zeros(mixing_shape(kind, components, num_heads, head_dim))
        w[:, :, 0] = init_hlc(components, num_heads, how)[..., None]
        return w
    w = torch.zeros(mixing_shape(kind, components, num_heads, head_dim))
    feature = torch.arange(num_heads * head_dim)
    w.view(components, -1)[feature % components, feature] = 1.0
    return w


def check_mixing(*, num_kv_heads: int, head_dim: int, key_components: int, value_components: int, key_mixing: str,
                 value_mixing: str, value_latent_dim: int | None, hlc: bool, qk_norm: bool, where: str = "") -> None:
    """ValueError, naming the setting and the fix, for a key/value cache no layer can have."""
    h = num_kv_heads
    if key_mixing not in KEY_MIXINGS:
        raise ValueError(f"{where}key mixing must be one of {KEY_MIXINGS}, got {key_mixing!r}")
    if value_mixing not in VALUE_MIXINGS:
        raise ValueError(f"{where}value mixing must be one of {VALUE_MIXINGS}, got {value_mixing!r}")
    if not 1 <= key_components <= h:
        raise ValueError(f"{where}key components h'_K must be in [1, h={h}], got {key_components}")
    if value_mixing == "head" and not 1 <= value_components <= h:
        raise ValueError(f"{where}value components h'_V must be in [1, h={h}], got {value_components}")
    if value_mixing == "latent":
        if value_latent_dim is None or not 1 <= value_latent_dim <= h * head_dim:
            raise ValueError(f"{where}value mixing 'latent' needs a latent width in [1, h*D={h * head_dim}], "
                             f"got {value_latent_dim}")
    elif value_latent_dim is not None:
        raise ValueError(f"{where}a value latent width ({value_latent_dim}) needs value mixing 'latent'")
    compressed = key_components < h or (value_components < h if value_mixing == "head" else False)
    if not hlc and (compressed or key_mixing != "head" or value_mixing != "head"):
        raise ValueError(f"{where}fewer components or a finer mixing needs hlc=True (mixing rebuilds the h heads)")
    if qk_norm and key_mixing != "head":
        raise ValueError(f"{where}QK-norm normalises composite keys with a per-feature scale that does not commute "
                         "with per-pair complex mixing; use key mixing 'head' for models with QK-norm")
