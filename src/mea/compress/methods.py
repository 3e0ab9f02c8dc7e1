"""The compression methods `mea compress --method` offers: a weighting and a mixing family for keys and values.
Light on purpose (no torch import): the CLI reads the names from here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    weighted: bool  # fit on calibration inputs, keys weighted by query energy and values through W_O
    key_mixing: str  # "head" or "rope_pair" (`ops.mixing`)
    value_mixing: str  # "head" or "latent"


METHODS = {
    "whitened": Method(True, "head", "head"),  # activation-aware head-level HLC (the default)
    "svd": Method(False, "head", "head"),  # the paper's data-free weight SVD
    "rope-pair": Method(True, "rope_pair", "head"),  # keys: one complex weight per RoPE frequency pair
    "rope-pair-latent": Method(True, "rope_pair", "latent"),  # and values: a latent of any width through W_O
}


def method_of(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]
