"""Factor h composite heads into h' virtual (component) heads plus an HLC matrix.

A projection's heads W_j (D x C', j = 1..h; C' = C+1 with the bias as the last column) are replaced
by  W_j ~= sum_m A[m, j] V_m  with h' components V_m and A = W_lc (h' x h). The error of head j is
measured on real inputs and, optionally, through how it is used:

    err_j = tr(Q_j E_j Sigma E_j^T),     E_j = W_j - sum_m A[m, j] V_m

Sigma: input second moment (identity for the paper's data-free SVD, which then is the SVD of the
matrix with one column per head). Q_j (D x D): identity, or for keys the RoPE-averaged energy of the
queries that read head j, or for values W_O^T W_O of those queries.

With one Q for all heads the optimum is closed-form: the top-h' eigenvectors U of the h x h Gram
matrix G_jk = tr(Q W_j Sigma W_k^T) give V_m = sum_j U[j, m] W_j / s_m and A[m, j] = s_m U[j, m]
(components are combinations of the original heads; only h x h numbers are decomposed). With
per-head Q_j we start there and alternate exact least-squares steps for A and for V.
"""

from __future__ import annotations

import torch


def relative_error(w: torch.Tensor, approx: torch.Tensor, sigma: torch.Tensor, q_hDD: torch.Tensor | None = None) -> float:
    """sum_j tr(Q_j E_j Sigma E_j^T) / sum_j tr(Q_j W_j Sigma W_j^T) for heads (h, D, C'), E = W - approx;
    0 exact, 1 as bad as dropping the heads. Q = identity when q_hDD is None."""
    def energy(x):
        xs = x @ sigma  # (h, D, C)
        if q_hDD is not None:
            xs = q_hDD @ xs
        return torch.einsum("jdc,jdc->", xs, x).item()
    total = energy(w)
    return energy(w - approx) / total if total > 0 else 0.0


def weighted_error(w_hDC, v_mDC, a_mh, sigma, q_hDD=None) -> float:
    """`relative_error` of the head-level factorisation W_j ~= sum_m A[m, j] V_m."""
    return relative_error(w_hDC, torch.einsum("mj,mdc->jdc", a_mh, v_mDC), sigma, q_hDD)


def factorize_heads(w_hDC: torch.Tensor, sigma: torch.Tensor, num_components: int, *,
                    q_hDD: torch.Tensor | None = None, iterations: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (V (h', D, C), A (h', h)) in float64. h' = h reproduces W exactly."""
    h = w_hDC.shape[0]
    if not 1 <= num_components <= h:
        raise ValueError(f"virtual heads h' must be in [1, {h}], got {num_components}")
    w = w_hDC.double()
    sigma = sigma.double()
    q = q_hDD.double() if q_hDD is not None else None
    q_shared = q.mean(0) if q is not None else None
    ws = w @ sigma
    gram = torch.einsum("jdc,kdc->jk", q_shared @ ws if q_shared is not None else ws, w)  # (h, h)
    eigval, eigvec = torch.linalg.eigh((gram + gram.T) / 2)
    top = eigvec[:, -num_components:].flip(-1)  # (h, h')
    s = eigval[-num_components:].flip(-1).clamp_min(1e-30).sqrt()
    v = torch.einsum("jm,jdc->mdc", top, w) / s[:, None, None]
    a = (s[:, None] * top.T)  # (h', h)
    if q is not None and num_components < h:
        for _ in range(iterations):
            a = _solve_mixing(w, v, sigma, q)
            v = _solve_components(w, a, q)
    return _balance(w, v, a)


def _balance(w, v, a):
    """Rescale each component to the original heads' mean norm (and its HLC row inversely): the same
    function, but weights and HLC entries of comparable size, so recovery training is well conditioned."""
    target = w.flatten(1).norm(dim=1).mean()
    r = v.flatten(1).norm(dim=1).clamp_min(1e-30) / target
    return v / r[:, None, None], a * r[:, None]


def _solve_mixing(w, v, sigma, q):
    """Per head j: argmin_a tr(Q_j (W_j - sum_m a_m V_m) Sigma (...)^T)."""
    vs = v @ sigma  # (h', D, C)
    cols = []
    for j in range(w.shape[0]):
        qv = q[j] @ vs  # (h', D, C)  Q_j V_m Sigma
        g = torch.einsum("mdc,ndc->mn", qv, v)
        b = torch.einsum("mdc,dc->m", qv, w[j])
        cols.append(torch.linalg.lstsq(g, b[:, None]).solution[:, 0])
    return torch.stack(cols, dim=1)


def _solve_components(w, a, q):
    """argmin_V sum_j tr(Q_j E_j Sigma E_j^T): Sigma cancels, leaving one (h'D x h'D) system for all columns:
    sum_n (sum_j a_mj a_nj Q_j) V_n = sum_j a_mj Q_j W_j."""
    m, h = a.shape
    d = w.shape[1]
    lhs = torch.einsum("mj,nj,jde->mdne", a, a, q).reshape(m * d, m * d)
    rhs = torch.einsum("mj,jde,jec->mdc", a, q, w).reshape(m * d, -1)
    lhs = lhs + 1e-10 * lhs.diagonal().mean() * torch.eye(m * d, dtype=lhs.dtype)
    return torch.linalg.solve(lhs, rhs).reshape(m, d, -1)
