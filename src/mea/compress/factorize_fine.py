"""The finer factorisations, in the cache format of `ops.mixing`, each optimal in closed form.

Keys, "rope_pair": frequency pair p of composite key head j is a complex linear map of the input,
K_p[j] = W_j[p] + i W_j[p + D/2]  (a row over the C' = C+1 inputs, bias last). With the error of head j's
pair p weighted by a scalar q[j, p] (the RoPE-averaged query energy of `factor_model.query_weights`, equal
on both features of a pair) and measured on the inputs (second moment Sigma):

    err = sum_p sum_j q[j, p] |(K_p[j] - sum_m c[m, j, p] Z_p[m]) Sigma^1/2|^2

Scaling row j by sqrt(q[j, p]) turns each pair into a plain rank-M approximation: with U the top-M
eigenvectors of the h x h Hermitian matrix K'_p Sigma K'_p^H (K'_p = diag(sqrt q_p) K_p), Z_p = U^H K'_p
and c[m, j, p] = U[j, m] / sqrt(q[j, p]). The relative error at every M is the tail of the eigenvalues.

Values, "latent": all value features V (h D x C') ~ B A with a latent A (R x C'), any width R, error
weighted through the output projection, err = tr(Q E Sigma E^T), Q = blockdiag_j(sum over the queries
reading head j of W_O,i^T W_O,i). With P = Q^1/2 and U the top-R eigenvectors of P V Sigma V^T P:
A = U^T P V and B = P^-1 U.
"""

from __future__ import annotations

import torch


def _tail(eigval_desc: torch.Tensor) -> list[float]:
    """Relative error at rank 0..n from eigenvalues in descending order (summed over leading batch dims)."""
    vals = eigval_desc.clamp_min(0).reshape(-1, eigval_desc.shape[-1]).sum(0)
    total = vals.sum().clamp_min(1e-300)
    kept = torch.cat([vals.new_zeros(1), vals.cumsum(0)])
    return ((total - kept) / total).clamp_min(0).tolist()


def factorize_rope_pairs(w_hDC: torch.Tensor, sigma: torch.Tensor, num_components: int, *,
                         pair_weights_hP: torch.Tensor | None = None):
    """Keys (h, D, C') -> (components (M, D, C') real, mixing (M, h, 2, D/2), relative error at M = 0..h).
    pair_weights (h, D/2): the error weight of each head's frequency pair (None: all equal)."""
    h, d, c = w_hDC.shape
    if not 1 <= num_components <= h:
        raise ValueError(f"key components h'_K must be in [1, {h}], got {num_components}")
    half = d // 2
    w = w_hDC.double()
    k = torch.complex(w[:, :half], w[:, half:]).transpose(0, 1)  # (P, h, C')
    weights = torch.ones(h, half, dtype=torch.float64) if pair_weights_hP is None else pair_weights_hP.double()
    root = weights.clamp_min(1e-12 * weights.max()).sqrt().T[:, :, None]  # (P, h, 1)
    kw = k * root
    sig = sigma.double().to(kw.dtype)
    gram = kw @ sig @ kw.conj().transpose(1, 2)  # (P, h, h) Hermitian
    eigval, eigvec = torch.linalg.eigh((gram + gram.conj().transpose(1, 2)) / 2)
    eigval, eigvec = eigval.flip(-1), eigvec.flip(-1)  # descending
    u = eigvec[:, :, :num_components]  # (P, h, M)
    z = u.conj().transpose(1, 2) @ kw  # (P, M, C')
    mixing = u.transpose(1, 2) / root.transpose(1, 2)  # (P, M, h): c[m, j, p]
    # balance: every (component, pair) row at the originals' mean row norm, its weights inversely
    target = k.abs().pow(2).sum(-1).sqrt().mean()
    r = z.abs().pow(2).sum(-1).sqrt().clamp_min(1e-30) / target  # (P, M)
    z, mixing = z / r[..., None], mixing * r[..., None]
    components = torch.cat([z.real, z.imag], dim=0).permute(1, 0, 2)  # (M, D, C')
    mixing = torch.stack([mixing.real, mixing.imag], dim=-1).permute(1, 2, 3, 0)  # (M, h, 2, P)
    return components, mixing, _tail(eigval)


def _sqrt_and_inverse(q_hDD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    eigval, eigvec = torch.linalg.eigh(q_hDD)
    eigval = eigval.clamp_min(1e-10 * eigval.max())
    root = eigvec @ torch.diag_embed(eigval.sqrt()) @ eigvec.transpose(-1, -2)
    inv = eigvec @ torch.diag_embed(eigval.rsqrt()) @ eigvec.transpose(-1, -2)
    return torch.block_diag(*root), torch.block_diag(*inv)


def factorize_latent(w_hDC: torch.Tensor, sigma: torch.Tensor, width: int, *, q_hDD: torch.Tensor | None = None):
    """Values (h, D, C') -> (latent projection A (R, C'), read-out (R, h, D), relative error at R = 0..h D)."""
    h, d, c = w_hDC.shape
    if not 1 <= width <= h * d:
        raise ValueError(f"value latent width R must be in [1, h*D = {h * d}], got {width}")
    v = w_hDC.double().reshape(h * d, c)
    if q_hDD is None:
        root = inv = torch.eye(h * d, dtype=torch.float64)
    else:
        root, inv = _sqrt_and_inverse(q_hDD.double())
    m = root @ v
    gram = m @ sigma.double() @ m.T
    eigval, eigvec = torch.linalg.eigh((gram + gram.T) / 2)
    eigval, eigvec = eigval.flip(-1), eigvec.flip(-1)
    u = eigvec[:, :width]  # (h D, R)
    a, b = u.T @ m, inv @ u  # (R, C'), (h D, R)
    r = a.norm(dim=1).clamp_min(1e-30) / v.norm(dim=1).mean()  # balance latent rows against the originals
    return a / r[:, None], (b * r).T.reshape(width, h, d), _tail(eigval)
