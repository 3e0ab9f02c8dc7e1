"""Turning the quantized KV cache on or off: for a loaded MEA model (`mea compress --kv-bits`) and for a
checkpoint directory (`mea quantize-cache`, which rewrites only its config.json, atomically)."""

from __future__ import annotations

import json
from pathlib import Path

from .atomic import write_text_atomic

FIELDS = ("mea_kv_bits", "mea_kv_group_size", "mea_kv_residual")


def _fields(bits: int, group_size: int | None, residual: int | None) -> dict:
    """The config fields for `bits` (0: off, the model's dtype); group size and residual: None keeps them."""
    out = {"mea_kv_bits": bits or None}
    if group_size is not None:
        out["mea_kv_group_size"] = group_size
    if residual is not None:
        out["mea_kv_residual"] = residual
    return out


def set_kv_quant(model, bits: int, group_size: int | None = None, residual: int | None = None):
    """Quantize the cache of a loaded MEA model from its next cache on (config and layers alike); validated
    like the config fields (`ValueError` naming the field)."""
    from .models import MEAConfig, MEAForCausalLM

    if not isinstance(model, MEAForCausalLM):
        raise ValueError(f"the quantized cache is an MEA cache; convert this {type(model).__name__} first "
                         "(`mea convert`), or measure it with the mea-kv4 / mea-kv8 cache systems")
    fields = _fields(bits, group_size, residual)
    MEAConfig.from_dict({**model.config.to_dict(), **fields})  # validates before anything changes
    for name, value in fields.items():
        setattr(model.config, name, value)
    for layer in model.model.layers:
        layer.self_attn.set_kv_quant(model.config.kv_quant())
    return model


def quantize_cache_dir(path: str | Path, bits: int, group_size: int | None = None,
                       residual: int | None = None) -> dict:
    """Set the quantized-cache fields in the config.json of the MEA checkpoint `path`."""
    from .models import MEAConfig

    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} is not a checkpoint directory (no config.json)")
    data = json.loads(config_file.read_text())
    if data.get("model_type") != MEAConfig.model_type:
        raise ValueError(f"{path} is a {data.get('model_type')!r} checkpoint; the quantized cache is an MEA cache: "
                         f"`mea convert {path} OUT` first, or measure it with the mea-kv4 / mea-kv8 cache systems")
    data.update(_fields(bits, group_size, residual))
    cfg = MEAConfig.from_dict(data)  # the config-time checks
    write_text_atomic(config_file, json.dumps(data, indent=2, sort_keys=True) + "\n")
    return {"checkpoint": str(path), **{name: getattr(cfg, name) for name in FIELDS},
            "kv_bytes_per_token": cfg.kv_cache_bytes_per_token()}
