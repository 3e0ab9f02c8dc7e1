"""Exact export of an MEA model that caches one key and one value component per layer (h' = 1) as a plain
multi-query `LlamaForCausalLM` (one KV head), which any engine serves.

With one component, composite key j is a fixed linear map of the cached key k: K_j = W^K[0, j] k for head
mixing, or a complex weight per RoPE frequency pair for "rope_pair" mixing, which commutes with RoPE. So
q_i . K_G(i) = (A_i q_i) . k with A_i the absorbed query map (`ops.mixing.absorb_query`), applied to q_proj's
rows of head i: for head mixing, query rows scaled by W^K[0, G(i)]. Likewise each head's output is a fixed
linear map of the attention output over the cached value (`ops.mixing.read_values`: W^V[0, G(i)] for head
mixing, a (D, D) map for a value latent of width D), folded into o_proj's columns. The softmax scale stays
1/sqrt(D), as in Llama with head_dim D. Nothing is approximated.

Other plans cannot be exported exactly: h' > 1 components need one key head of width h' D read by every
query through its own absorbed map (not a Llama head), QK-norm's 1/RMS of each composite key is a per-head
logit factor, and GroupNorm has no Llama equivalent. They are served exactly by the vLLM plugin
(`mea serve`); h' = h folds into Llama/Qwen3 (`mea fold`).
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ..models import MEAConfig, MEAForCausalLM
from ..ops import absorb_query, read_values
from .fold import load_plain_state, plain_config_fields

EXPORT_TARGETS = ("llama",)

_ELSEWHERE = ("serve it exactly with the vLLM plugin (`mea serve MODEL`, docs/serving.md); a model with h' = h "
              "in every layer folds into Llama/Qwen3 with `mea fold`")


def check_mqa_exportable(cfg: MEAConfig) -> None:
    """ValueError naming the first obstacle to an exact multi-query export, and where to go instead."""
    if not cfg.mea_hlc:
        raise ValueError(f"this model has no HLC (mea_hlc=False), so no components to export; {_ELSEWHERE}")
    for flag, what in (("mea_differential", "differential attention"), ("use_qk_norm", "QK-norm"),
                       ("mea_head_norm", "GroupNorm (mea_head_norm)")):
        if getattr(cfg, flag):
            raise ValueError(f"--to llama cannot reproduce {what} exactly (Llama has no equivalent); {_ELSEWHERE}")
    for layer, (m_k, m_v, r) in enumerate(zip(cfg.key_components(), cfg.value_components(), cfg.value_latent_dims())):
        values_ok = (r == cfg.head_dim) if r is not None else m_v == 1
        if m_k != 1 or not values_ok:
            values = f"a value latent of width {r} (needs {cfg.head_dim})" if r is not None else f"h'_V={m_v}"
            raise ValueError(f"--to llama is exact only with one key and one value component (h' = 1) in every "
                             f"layer; layer {layer} has h'_K={m_k} and {values}: a plain multi-query model would "
                             f"lose its {m_k}-component keys or its values; {_ELSEWHERE}")


def _absorbed_query_rows(weight: torch.Tensor, w_k: torch.Tensor, kind: str, num_heads: int, num_kv_heads: int):
    """q_proj rows (N D, K) -> the rows of A_i q_i: `absorb_query` applied to every column (it is linear)."""
    k = weight.shape[1]
    cols = weight.T.reshape(1, k, num_heads, -1)  # column c as the query of one token
    return absorb_query(cols, w_k, kind, num_kv_heads)[0].reshape(k, -1).T


def _read_value_columns(weight: torch.Tensor, w_v: torch.Tensor, kind: str, num_heads: int, num_kv_heads: int,
                        head_dim: int) -> torch.Tensor:
    """o_proj (C, N D) -> (C, N D) acting on the attention outputs over the cached value: o_proj composed
    with `read_values` (linear), whose matrix comes from reading the basis vectors."""
    width = num_heads * head_dim
    basis = torch.eye(width, dtype=weight.dtype).view(1, width, num_heads, head_dim)
    read = read_values(basis, w_v, kind, num_kv_heads, head_dim)[0].reshape(width, width)  # row e_k -> read(e_k)
    return weight @ read.T


@torch.no_grad()
def export_mqa(model: MEAForCausalLM) -> LlamaForCausalLM:
    """The exact `LlamaForCausalLM` (num_key_value_heads=1) of an MEA model with h' = 1 in every layer."""
    cfg = model.config
    check_mqa_exportable(cfg)
    n, h, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    state = {k: v for k, v in model.state_dict().items() if ".hlc_" not in k}
    for i, layer in enumerate(model.model.layers):
        attn, prefix = layer.self_attn, f"model.layers.{i}.self_attn"
        w_k, w_v = attn.hlc_k.to(attn.q_proj.weight.dtype), attn.hlc_v.to(attn.q_proj.weight.dtype)
        state[f"{prefix}.q_proj.weight"] = _absorbed_query_rows(attn.q_proj.weight, w_k, attn.key_mixing, n, h)
        if attn.q_proj.bias is not None:
            state[f"{prefix}.q_proj.bias"] = _absorbed_query_rows(attn.q_proj.bias[:, None], w_k, attn.key_mixing,
                                                                  n, h)[:, 0]
        state[f"{prefix}.o_proj.weight"] = _read_value_columns(attn.o_proj.weight, w_v, attn.value_mixing, n, h, d)
    fields = {**plain_config_fields(cfg), "num_key_value_heads": 1}
    plain = LlamaForCausalLM(LlamaConfig(**fields, mlp_bias=cfg.mlp_bias))
    load_plain_state(plain, state, attention_bias=fields["attention_bias"])
    return plain.to(model.dtype).eval()
