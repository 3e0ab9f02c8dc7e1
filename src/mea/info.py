"""What `mea info` reports: versions, the registry, and a model's KV-cache footprint."""

from __future__ import annotations

import platform

import torch
import transformers

from .models import PRESETS, VARIANTS, MEAConfig, make_config
from .ops import SUPPORTED_ROPE_TYPES


def versions() -> dict:
    import mea

    return {"mea": mea.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def registry() -> dict:
    return {"presets": {name: {k: v for k, v in p.items() if k != "rope_parameters"} for name, p in PRESETS.items()},
            "variants": VARIANTS, "rope_types": list(SUPPORTED_ROPE_TYPES), "model_type": MEAConfig.model_type}


def resolve_config(model: str, kv_bits: int | None = None) -> MEAConfig:
    """A preset name, or a checkpoint directory (MEA or any Hugging Face causal LM config); `kv_bits`: with the
    cache quantized so (0: not quantized)."""
    if kv_bits is not None:
        cfg = resolve_config(model)
        if not isinstance(cfg, MEAConfig):
            raise ValueError(f"{model} is not an MEA model; --kv-bits describes MEA's quantized cache "
                             "(`mea convert` first)")
        return MEAConfig.from_dict({**cfg.to_dict(), "mea_kv_bits": kv_bits or None})
    if model in PRESETS:
        return make_config(model)
    from pathlib import Path

    from transformers import AutoConfig

    if not (Path(model) / "config.json").is_file():
        raise ValueError(f"{model!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint directory with config.json")
    import mea  # noqa: F401

    return AutoConfig.from_pretrained(model)


def kv_report(cfg, bytes_per_element: int = 2) -> dict:
    """KV-cache bytes per token (all layers) at a given element size, against the uncompressed h' = h."""
    d = cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads
    baseline = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * d * bytes_per_element
    report = {"bytes_per_element": bytes_per_element, "uncompressed_kv_bytes_per_token": baseline}
    if not isinstance(cfg, MEAConfig):
        heads = [cfg.num_key_value_heads] * cfg.num_hidden_layers
        return {**report, "kv_bytes_per_token": baseline, "fraction": 1.0, "component_heads_per_layer": heads}
    per_token = cfg.kv_cache_bytes_per_token(bytes_per_element)
    layouts = cfg.cache_layouts()
    same_heads = cfg.mea_value_mixing == "head" and cfg.key_components() == cfg.value_components()
    report.update(kv_bytes_per_token=per_token, fraction=per_token / baseline,
                  component_heads_per_layer=cfg.key_components() if same_heads else None,
                  cached_per_layer=[{"keys": list(layout.key_shape), "values": list(layout.value_shape),
                                     "decode": layout.kernel} for layout in layouts])
    if cfg.mea_key_mixing != "head" or cfg.mea_value_mixing != "head":
        report["mixing"] = {"keys": cfg.mea_key_mixing, "values": cfg.mea_value_mixing}
    quant = cfg.kv_quant()
    if quant is not None:
        float_tail = cfg.kv_cache_bytes(quant.residual + quant.group_size - 1, bytes_per_element)
        report["quantized_cache"] = {
            "bits": quant.bits, "group_size": quant.group_size, "residual": quant.residual,
            "kv_bytes_per_token_with_scales": per_token,
            "scale_bytes_per_token": sum(layout.storage_heads * quant.scale_bytes_per_token(
                layout.key_features, layout.value_features) for layout in layouts),
            "full_precision_tail_bytes_at_most": float_tail,
            "note": "kv_bytes_per_token: codes and float16 scales/zero points per token of a long context; the most "
                    "recent tokens (at most residual + group_size - 1) stay in full precision"}
    return report


def count_parameters(cfg) -> int:
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())
