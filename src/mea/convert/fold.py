"""Fold HLC into k_proj / v_proj when h' = h, and export a plain Hugging Face model.

With h' = h, composite head j is  K_j = sum_m W^K[m, j] (W_k,m x + b_m), a linear map of x; so the
folded projection is  W'_k,j = sum_m W^K[m, j] W_k,m  (same for biases and for V). QK-norm acts on
composite heads in MEA, so it stays where it is. The result has zero HLC overhead at inference.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, Qwen3Config, Qwen3ForCausalLM

from ..models import MEAConfig, MEAForCausalLM
from ..ops import fold_mixing


def _fold_projection(proj: torch.nn.Linear, w: torch.Tensor, kind: str, head_dim: int) -> None:
    weight, bias = fold_mixing(proj.weight, proj.bias, w, kind, head_dim)
    proj.weight = torch.nn.Parameter(weight)
    if bias is not None:
        proj.bias = torch.nn.Parameter(bias)


@torch.no_grad()
def fold_hlc(model: MEAForCausalLM) -> MEAForCausalLM:
    """A copy of `model` with HLC folded into the projections (mea_hlc=False); needs h' = h everywhere."""
    cfg = model.config
    if not cfg.mea_hlc:
        raise ValueError("this model has no HLC to fold (mea_hlc is False)")
    if any(layout.absorbed for layout in cfg.cache_layouts()):
        raise ValueError("fold needs h' = h in every layer; a compressed model (h' < h) cannot be folded "
                         "without losing its cache saving")
    folded_cfg = MEAConfig(**{**cfg.to_dict(), "mea_hlc": False, "mea_num_component_heads": None, "mea_hlc_init": None,
                              "mea_num_key_components": None, "mea_num_value_components": None,
                              "mea_key_mixing": "head", "mea_value_mixing": "head", "mea_value_latent_dim": None})
    folded = MEAForCausalLM(folded_cfg).to(model.dtype)
    state = {k: v for k, v in model.state_dict().items() if ".hlc_" not in k}
    folded.load_state_dict(state, strict=True, assign=False)
    for src, dst in zip(model.model.layers, folded.model.layers):
        _fold_projection(dst.self_attn.k_proj, src.self_attn.hlc_k, src.self_attn.key_mixing, cfg.head_dim)
        _fold_projection(dst.self_attn.v_proj, src.self_attn.hlc_v, src.self_attn.value_mixing, cfg.head_dim)
    return folded.eval()


def plain_config_fields(cfg: MEAConfig) -> dict:
    """The Llama / Qwen3 config fields of the same shape as an MEA config."""
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=dict(cfg.rope_parameters), tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=cfg.attention_bias or cfg.attention_out_bias, bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
    )


@torch.no_grad()
def export_plain(model: MEAForCausalLM) -> PreTrainedModel:
    """Fold HLC, then: without GroupNorm -> LlamaForCausalLM (Qwen3ForCausalLM with QK-norm);
    with GroupNorm -> the folded MEA model (GroupNorm has no plain Hugging Face equivalent)."""
    folded = fold_hlc(model) if model.config.mea_hlc else model
    cfg = folded.config
    if cfg.mea_head_norm:
        return folded
    fields = plain_config_fields(cfg)
    if cfg.use_qk_norm:
        if cfg.qk_norm_eps != cfg.rms_norm_eps or cfg.mlp_bias:
            raise ValueError("a Qwen3 export needs qk_norm_eps == rms_norm_eps and no MLP bias")
        plain = Qwen3ForCausalLM(Qwen3Config(**fields))
    else:
        plain = LlamaForCausalLM(LlamaConfig(**fields, mlp_bias=cfg.mlp_bias))
    load_plain_state(plain, folded.state_dict(), attention_bias=fields["attention_bias"])
    return plain.to(model.dtype).eval()


def load_plain_state(plain: PreTrainedModel, state: dict, *, attention_bias: bool) -> None:
    """Load MEA-named weights into a Llama/Qwen3 model (strict). Llama/Qwen3 put the bias flag on q, k, v and o
    together: the biases MEA does not have are filled with 0."""
    if attention_bias:
        state = dict(state)
        for name, p in plain.state_dict().items():
            if name.endswith(".bias") and name not in state:
                state[name] = torch.zeros_like(p)
    plain.load_state_dict(state, strict=True)
