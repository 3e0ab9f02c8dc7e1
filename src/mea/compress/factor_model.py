"""Apply virtual-head factorisation to the layers of an MEA model."""

from __future__ import annotations

import torch

from ..layers import MEAAttention
from ..models import MEAConfig, MEAForCausalLM
from ..ops import fold_into_projection
from .factorize import factorize_heads, weighted_error

METHODS = ("whitened", "svd")


def _heads(proj: torch.nn.Linear, hlc: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Composite heads of a projection as (h, D, C+1), the bias as the last column."""
    weight, bias = fold_into_projection(proj.weight, proj.bias, hlc, head_dim)
    h = hlc.shape[1]
    bias = torch.zeros(h * head_dim, dtype=weight.dtype) if bias is None else bias
    return torch.cat([weight, bias[:, None]], dim=1).view(h, head_dim, -1).double()


def query_weights(attn, sigma: torch.Tensor) -> torch.Tensor:
    """(h, D, D): for each KV head, the energy of its group's queries per RoPE frequency pair.
    Averaged over relative rotations, E[(q . R e)^2] weighs both features of pair p by
    (E q_p^2 + E q_{p+D/2}^2) / 2 and cancels cross terms, hence a diagonal."""
    d, n, h = attn.head_dim, attn.num_heads, attn.num_kv_heads
    wq = _heads(attn.q_proj, torch.eye(n, dtype=attn.q_proj.weight.dtype), d)  # (N, D, C+1)
    if attn.q_norm is not None:  # per-feature scale of Qwen3's q_norm (its 1/RMS is ignored here)
        wq = wq * attn.q_norm.weight.double()[None, :, None]
    energy = torch.einsum("ndc,ce,nde->nd", wq, sigma, wq)  # (N, D) = diag(W_q,i Sigma W_q,i^T)
    pair = (energy[:, : d // 2] + energy[:, d // 2 :]) / 2
    energy = torch.cat([pair, pair], dim=1).view(h, n // h, d).sum(1)  # (h, D)
    energy = energy / energy.mean()
    return torch.diag_embed(energy)


def key_norm_objective(attn, q_k: torch.Tensor | None, key_stats) -> tuple[torch.Tensor, torch.Tensor]:
    """(key moment (C+1, C+1), key weights Q_j (h, D, D)) for a layer whose keys go through QK-norm: the
    attention sees g * k_j / RMS(k_j), so the error E_j x of composite key j counts as g * E_j x / RMS(k_j(x)).
    The per-feature scale g enters Q_j on both sides (G Q_j G); the 1/RMS^2 weight enters through the key
    moment of `key_moments` and its per-head factors c_j. (The radial part of the error, which the norm
    removes, is still counted: an upper bound.)"""
    if key_stats is None:
        raise ValueError("this layer normalises its keys (QK-norm): whitened compression needs its key moments "
                         "(mea.compress.calibrate.key_moments)")
    sigma_k, head_scale = key_stats
    g = attn.k_norm.weight.double()
    h, d = attn.num_kv_heads, attn.head_dim
    base = q_k if q_k is not None else torch.eye(d, dtype=torch.float64).expand(h, d, d)
    return sigma_k.double(), head_scale.double()[:, None, None] * g[None, :, None] * base * g[None, None, :]


def output_weights(attn) -> torch.Tensor:
    """(h, D, D): sum over the group's query heads of W_O,i^T W_O,i: value errors as seen after o_proj."""
    d, n, h = attn.head_dim, attn.num_heads, attn.num_kv_heads
    wo = attn.o_proj.weight.double().view(-1, n, d)  # (C, N, D)
    m = torch.einsum("cnd,cne->nde", wo, wo).view(h, n // h, d, d).sum(1)
    return m / m.diagonal(dim1=-2, dim2=-1).mean()


@torch.no_grad()
def factor_attention(attn, target: int, *, method: str = "whitened", sigma: torch.Tensor | None = None,
                     key_stats: tuple[torch.Tensor, torch.Tensor] | None = None, key_weighting: bool = True,
                     value_weighting: bool = True, iterations: int = 30):
    """A new `MEAAttention` with `target` virtual heads approximating `attn`, and its error report.
    sigma: the layer's (C+1, C+1) input moment (needed by 'whitened'); key_stats: its `key_moments` entry
    (needed by 'whitened' when the layer has QK-norm)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not attn.hlc:
        raise ValueError("compression needs an MEA layer with HLC (hlc=True); convert the model first")
    if target > attn.num_component_heads:
        raise ValueError(f"the layer already has h'={attn.num_component_heads} < {target}; "
                         "compress from the uncompressed model")
    if method == "whitened" and sigma is None:
        raise ValueError("method 'whitened' needs calibration moments")
    c = attn.q_proj.in_features
    has_bias = attn.k_proj.bias is not None

    def without_bias(m: torch.Tensor) -> torch.Tensor:  # no bias column to fit: keep it out of the objective
        if has_bias:
            return m
        m = m.clone()
        m[c, :] = m[:, c] = 0.0
        m[c, c] = 1.0
        return m

    metric = without_bias(sigma if method == "whitened" else torch.eye(c + 1, dtype=torch.float64))
    weighted = method == "whitened"
    q = {"k": query_weights(attn, metric) if weighted and key_weighting else None,
         "v": output_weights(attn) if weighted and value_weighting else None}
    metrics = {"k": metric, "v": metric}
    if weighted and attn.k_norm is not None:
        sigma_k, q["k"] = key_norm_objective(attn, q["k"], key_stats)
        metrics["k"] = without_bias(sigma_k)
    new = MEAAttention(**{**attn.spec, "num_component_heads": target, "hlc": True}).to(attn.q_proj.weight.dtype)
    state = {k: v for k, v in attn.state_dict().items() if not k.startswith(("k_proj", "v_proj", "hlc_"))}
    row = {"virtual_heads": target}
    for name, proj, hlc in (("k", attn.k_proj, attn.hlc_k), ("v", attn.v_proj, attn.hlc_v)):
        w = _heads(proj, hlc, attn.head_dim)
        comp, mix = factorize_heads(w, metrics[name], target, q_hDD=q[name], iterations=iterations)
        row[f"{name}_error"] = weighted_error(w, comp, mix, metrics[name] if weighted else (
            sigma if sigma is not None else metric), q[name])
        dtype = proj.weight.dtype
        state[f"{name}_proj.weight"] = comp[..., :c].reshape(target * attn.head_dim, c).to(dtype)
        if has_bias:
            state[f"{name}_proj.bias"] = comp[..., c].reshape(-1).to(dtype)
        state[f"hlc_{name}"] = mix.to(dtype)
    new.load_state_dict(state, strict=True)
    return new, row


@torch.no_grad()
def factor_model(model: MEAForCausalLM, plan: list[int], *, method: str = "whitened",
                 moments: list[torch.Tensor] | None = None, key_moments: list | None = None,
                 key_weighting: bool = True, value_weighting: bool = True,
                 iterations: int = 30) -> tuple[MEAForCausalLM, list[dict]]:
    """A new model whose layer l has plan[l] virtual heads (layers already at plan[l] are copied).
    moments / key_moments: per layer, from `calibrate.input_moments` / `calibrate.key_moments`."""
    cfg = model.config
    if len(plan) != cfg.num_hidden_layers:
        raise ValueError(f"plan has {len(plan)} entries for {cfg.num_hidden_layers} layers")
    if not cfg.mea_hlc:
        raise ValueError("compression needs an MEA model with HLC (mea_hlc=True); convert it first")
    state = dict(model.state_dict())
    report = []
    for i, (layer, target) in enumerate(zip(model.model.layers, plan)):
        if target == layer.self_attn.num_component_heads:
            continue
        new, row = factor_attention(layer.self_attn, target, method=method,
                                    sigma=moments[i] if moments is not None else None,
                                    key_stats=key_moments[i] if key_moments is not None else None,
                                    key_weighting=key_weighting,
                                    value_weighting=value_weighting, iterations=iterations)
        state.update({f"model.layers.{i}.self_attn.{k}": v for k, v in new.state_dict().items()})
        report.append({"layer": i, **row})
    new_cfg = MEAConfig(**{**cfg.to_dict(), "mea_num_component_heads": list(plan), "mea_hlc_init": None})
    compressed = MEAForCausalLM(new_cfg).to(model.dtype)
    compressed.load_state_dict(state, strict=True)
    return compressed.eval(), report
