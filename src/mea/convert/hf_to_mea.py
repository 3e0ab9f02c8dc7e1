"""Convert a Llama / Mistral / Qwen2 / Qwen3 model into an MEA model with identity HLC and no
GroupNorm: the same function (logits equal up to float rounding), ready for compression."""

from __future__ import annotations

import re
import warnings

import torch
from transformers import PreTrainedModel

from ..models import MEAConfig, MEAForCausalLM
from .families import FAMILIES, SHARED_FIELDS, WEIGHT_MAP


def mea_config_from(config) -> MEAConfig:
    family = getattr(config, "model_type", None)
    if family == "mea":
        return config
    if family not in FAMILIES:
        raise ValueError(f"unsupported architecture {family!r}; supported: {', '.join(FAMILIES)} (and mea)")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", family == "mistral"):
        warnings.warn(f"{family}: sliding_window={config.sliding_window} is dropped; the converted model attends "
                      "to the full context (identical up to that length)", stacklevel=2)
    fields = {name: getattr(config, name) for name in SHARED_FIELDS if getattr(config, name, None) is not None}
    fields["head_dim"] = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    fields["rope_parameters"] = dict(config.rope_parameters)
    fields.update({name: rule(config) for name, rule in FAMILIES[family].items()})
    return MEAConfig(**fields, mea_hlc=True, mea_head_norm=False)


def map_weight_name(name: str) -> str:
    for pattern, target in WEIGHT_MAP:
        if re.match(pattern, name):
            return re.sub(pattern, target, name)
    raise ValueError(f"weight {name!r} has no place in an MEA model; the source is not a plain "
                     f"{'/'.join(FAMILIES)} decoder")


@torch.no_grad()
def to_mea(model: PreTrainedModel) -> MEAForCausalLM:
    """An MEA copy of `model` (identity HLC, GroupNorm off). An MEA model is returned as is."""
    if isinstance(model, MEAForCausalLM):
        return model
    cfg = mea_config_from(model.config)
    state = {map_weight_name(k): v for k, v in model.state_dict().items()}
    mea_model = MEAForCausalLM(cfg)  # HLC starts at identity, GroupNorm is off: the same function
    missing, unexpected = mea_model.load_state_dict(state, strict=False)
    missing = [k for k in missing if ".hlc_" not in k and not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return mea_model.to(next(model.parameters()).dtype).eval()
