"""Apply virtual-head factorisation to the layers of an MEA model."""

from __future__ import annotations

import copy

import torch

from ..layers import MEAAttention
from ..models import MEAConfig, MEAForCausalLM
from ..ops import fold_mixing
from .factorize import factorize_heads, relative_error, weighted_error
from .factorize_fine import factorize_latent, factorize_rope_pairs
from .methods import Method, method_of


def layer_target(target, method: Method, head_dim: int) -> tuple[int, int]:
    """A layer's target as (key components h'_K, value size): h'_V heads, or the latent width R. An int h'
    means h' heads for both (R = h' D: the same bytes)."""
    if isinstance(target, int):
        return target, target * head_dim if method.value_mixing == "latent" else target
    key, value = target
    return int(key), int(value)


def _heads(proj: torch.nn.Linear, mixing: torch.Tensor, kind: str, num_heads: int, head_dim: int) -> torch.Tensor:
    """Composite heads of a projection as (h, D, C+1), the bias as the last column."""
    weight, bias = fold_mixing(proj.weight, proj.bias, mixing, kind, head_dim)
    bias = torch.zeros(num_heads * head_dim, dtype=weight.dtype) if bias is None else bias
    return torch.cat([weight, bias[:, None]], dim=1).view(num_heads, head_dim, -1).double()


def composite_heads(attn) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's h composite key and value heads as maps of [x; 1]: (h, D, C+1) each, float64."""
    h, d = attn.num_kv_heads, attn.head_dim
    if not attn.hlc:
        return _heads(attn.k_proj, torch.eye(h), "head", h, d), _heads(attn.v_proj, torch.eye(h), "head", h, d)
    return (_heads(attn.k_proj, attn.hlc_k, attn.key_mixing, h, d),
            _heads(attn.v_proj, attn.hlc_v, attn.value_mixing, h, d))


def query_weights(attn, sigma: torch.Tensor) -> torch.Tensor:
    """(h, D, D): for each KV head, the energy of its group's queries per RoPE frequency pair.
    Averaged over relative rotations, E[(q . R e)^2] weighs both features of pair p by
    (E q_p^2 + E q_{p+D/2}^2) / 2 and cancels cross terms, hence a diagonal."""
    d, n, h = attn.head_dim, attn.num_heads, attn.num_kv_heads
    wq = _heads(attn.q_proj, torch.eye(n, dtype=attn.q_proj.weight.dtype), "head", n, d)  # (N, D, C+1)
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


def on_cpu(attn, *stats):
    """The factorisation runs on the CPU in float64 whatever device the model is on: a CPU copy of one layer
    (the layer itself when it is there already) and its calibration statistics (tensors, tuples, None)."""
    def cpu(x):
        return tuple(map(cpu, x)) if isinstance(x, tuple) else None if x is None else x.cpu()

    return (attn if attn.q_proj.weight.device.type == "cpu" else copy.deepcopy(attn).cpu()), *map(cpu, stats)


@torch.no_grad()
def factor_attention(attn, target, *, method: str = "whitened", sigma: torch.Tensor | None = None,
                     key_stats: tuple[torch.Tensor, torch.Tensor] | None = None, key_weighting: bool = True,
                     value_weighting: bool = True, iterations: int = 30):
    """A new `MEAAttention` approximating `attn` with `target` (see `layer_target`), on `attn`'s device, and its
    error report: k_error / v_error on the method's objective, k_rel_error / v_rel_error unweighted on the
    inputs (Sigma when given, else the weights alone). sigma: the layer's (C+1, C+1) input moment; key_stats:
    its `key_moments` entry (needed by weighted methods when the layer has QK-norm)."""
    new, row = _factor_attention(*on_cpu(attn, sigma, key_stats), target, method=method, key_weighting=key_weighting,
                                 value_weighting=value_weighting, iterations=iterations)
    return new.to(attn.q_proj.weight.device), row


def _factor_attention(attn, sigma, key_stats, target, *, method, key_weighting, value_weighting, iterations):
    spec = method_of(method)
    if not attn.hlc:
        raise ValueError("compression needs an MEA layer with HLC (hlc=True); convert the model first")
    if spec.weighted and sigma is None:
        raise ValueError(f"method {method!r} needs calibration moments")
    if attn.k_norm is not None and spec.key_mixing != "head":
        raise ValueError(f"method {method!r} mixes keys per RoPE pair, which QK-norm's per-feature scale does not "
                         "commute with; for a model with QK-norm use --method whitened or svd")
    h, d = attn.num_kv_heads, attn.head_dim
    key_target, value_target = layer_target(target, spec, d)
    if attn.cache_layout.absorbed:
        raise ValueError(f"layer {attn.layer_idx} is already compressed; compress from the uncompressed model")
    c = attn.q_proj.in_features
    has_bias = attn.k_proj.bias is not None

    def without_bias(m: torch.Tensor) -> torch.Tensor:  # no bias column to fit: keep it out of the objective
        if has_bias:
            return m
        m = m.clone()
        m[c, :] = m[:, c] = 0.0
        m[c, c] = 1.0
        return m

    metric = without_bias(sigma if spec.weighted else torch.eye(c + 1, dtype=torch.float64))
    q = {"k": query_weights(attn, metric) if spec.weighted and key_weighting else None,
         "v": output_weights(attn) if spec.weighted and value_weighting else None}
    metrics = {"k": metric, "v": metric}
    if spec.weighted and attn.k_norm is not None:
        sigma_k, q["k"] = key_norm_objective(attn, q["k"], key_stats)
        metrics["k"] = without_bias(sigma_k)
    latent = spec.value_mixing == "latent"
    new = MEAAttention(**{**attn.spec, "num_component_heads": key_target, "num_key_components": key_target,
                          "num_value_components": None if latent else value_target, "key_mixing": spec.key_mixing,
                          "value_mixing": spec.value_mixing, "value_latent_dim": value_target if latent else None,
                          "hlc": True}).to(attn.q_proj.weight.dtype)
    state = {k: v for k, v in attn.state_dict().items() if not k.startswith(("k_proj", "v_proj", "hlc_"))}
    row = {"key_components": key_target, ("value_latent" if latent else "value_components"): value_target}
    for name, proj, w in zip("kv", (attn.k_proj, attn.v_proj), composite_heads(attn)):
        size, new_kind = (key_target, spec.key_mixing) if name == "k" else (value_target, spec.value_mixing)
        m = metrics[name]
        if new_kind == "rope_pair":
            weights = None if q[name] is None else q[name].diagonal(dim1=-2, dim2=-1)[:, : d // 2]
            comp, mix_w, _ = factorize_rope_pairs(w, m, size, pair_weights_hP=weights)
        elif new_kind == "latent":
            comp, mix_w, _ = factorize_latent(w, m, size, q_hDD=q[name])
        else:
            comp, mix_w = factorize_heads(w, m, size, q_hDD=q[name], iterations=iterations)
        dtype = proj.weight.dtype
        comp = comp.reshape(-1, c + 1)  # (width, C+1)
        approx = _heads_of(comp, mix_w, new_kind, h, d)
        plain = sigma if sigma is not None else metric
        row[f"{name}_error"] = relative_error(w, approx, plain if m is metric else m, q[name])
        row[f"{name}_rel_error"] = relative_error(w, approx, plain)
        state[f"{name}_proj.weight"] = comp[:, :c].to(dtype)
        if has_bias:
            state[f"{name}_proj.bias"] = comp[:, c].to(dtype)
        state[f"hlc_{name}"] = mix_w.to(dtype)
    new.load_state_dict(state, strict=True)
    return new, row


def _heads_of(comp: torch.Tensor, mixing: torch.Tensor, kind: str, num_heads: int, head_dim: int) -> torch.Tensor:
    """Composite heads (h, D, C+1) rebuilt from the fitted components (width, C+1) and mixing."""
    weight, _ = fold_mixing(comp, None, mixing, kind, head_dim)
    return weight.view(num_heads, head_dim, -1)


@torch.no_grad()
def error_curves(attn, sigma: torch.Tensor | None, method: str, *, iterations: int = 30) -> dict[str, list[float]]:
    """The layer's relative error on the method's objective at every cache size: keys at h'_K = 0..h, values at
    h'_V = 0..h heads or, for a value latent, at width R = 0..h D (closed form from one decomposition for the
    finer families; one factorisation per size for head-level mixing)."""
    spec = method_of(method)
    if spec.weighted and sigma is None:
        raise ValueError(f"method {method!r} needs calibration moments")
    attn, sigma = on_cpu(attn, sigma)
    h, d = attn.num_kv_heads, attn.head_dim
    c = attn.q_proj.in_features
    metric = sigma if spec.weighted else torch.eye(c + 1, dtype=torch.float64)
    w_k, w_v = composite_heads(attn)
    q_k, q_v = (query_weights(attn, metric), output_weights(attn)) if spec.weighted else (None, None)

    def head_curve(w, q):
        return [1.0] + [weighted_error(w, *factorize_heads(w, metric, m, q_hDD=q, iterations=iterations), metric, q)
                        for m in range(1, h)] + [0.0]

    if spec.key_mixing == "rope_pair":
        weights = None if q_k is None else q_k.diagonal(dim1=-2, dim2=-1)[:, : d // 2]
        keys = factorize_rope_pairs(w_k, metric, h, pair_weights_hP=weights)[2]
    else:
        keys = head_curve(w_k, q_k)
    values = factorize_latent(w_v, metric, h * d, q_hDD=q_v)[2] if spec.value_mixing == "latent" else head_curve(w_v, q_v)
    return {"key": keys, "value": values}


def keeps_layer(target: tuple[int, int], spec: Method, num_kv_heads: int, head_dim: int) -> bool:
    """Whether a layer with `target` stays as it is: the uncompressed size in the heads' own mixing."""
    full = (num_kv_heads, num_kv_heads * head_dim if spec.value_mixing == "latent" else num_kv_heads)
    return target == full and spec.key_mixing == "head" and spec.value_mixing == "head"


def compressed_config(cfg: MEAConfig, targets: list[tuple[int, int]], spec: Method) -> MEAConfig:
    """The config of the model whose layers have `targets` (see `layer_target`), compressed by `spec`."""
    keys, values = [k for k, _ in targets], [v for _, v in targets]
    fields = {"mea_num_component_heads": keys, "mea_num_key_components": None, "mea_num_value_components": None,
              "mea_key_mixing": spec.key_mixing, "mea_value_mixing": spec.value_mixing, "mea_value_latent_dim": None,
              "mea_hlc_init": None}
    if spec.value_mixing == "latent":
        fields["mea_value_latent_dim"] = values
    elif keys != values:
        fields.update(mea_num_key_components=keys, mea_num_value_components=values)
    return MEAConfig(**{**cfg.to_dict(), **fields})


@torch.no_grad()
def factor_model(model: MEAForCausalLM, plan: list, *, method: str = "whitened",
                 moments: list[torch.Tensor] | None = None, key_moments: list | None = None,
                 key_weighting: bool = True, value_weighting: bool = True,
                 iterations: int = 30) -> tuple[MEAForCausalLM, list[dict]]:
    """A new model whose layer l has the target plan[l] (an int h', or (h'_K, h'_V or latent width R): see
    `layer_target`); layers whose target is the uncompressed size are copied. moments / key_moments: per
    layer, from `calibrate.input_moments` / `calibrate.key_moments`."""
    cfg = model.config
    spec = method_of(method)
    if len(plan) != cfg.num_hidden_layers:
        raise ValueError(f"plan has {len(plan)} entries for {cfg.num_hidden_layers} layers")
    if not cfg.mea_hlc:
        raise ValueError("compression needs an MEA model with HLC (mea_hlc=True); convert it first")
    h, d = cfg.num_key_value_heads, cfg.head_dim
    targets = [layer_target(t, spec, d) for t in plan]
    state = dict(model.state_dict())
    report = []
    for i, (layer, target) in enumerate(zip(model.model.layers, targets)):
        if keeps_layer(target, spec, h, d):
            continue
        new, row = factor_attention(layer.self_attn, target, method=method,
                                    sigma=moments[i] if moments is not None else None,
                                    key_stats=key_moments[i] if key_moments is not None else None,
                                    key_weighting=key_weighting,
                                    value_weighting=value_weighting, iterations=iterations)
        state.update({f"model.layers.{i}.self_attn.{k}": v for k, v in new.state_dict().items()})
        report.append({"layer": i, **row})
    compressed = MEAForCausalLM(compressed_config(cfg, targets, spec)).to(model.device, model.dtype)
    compressed.load_state_dict(state, strict=True)
    return compressed.eval(), report
