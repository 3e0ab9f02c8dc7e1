"""GroupNorm's initial weight measured from data (`mea_head_norm_init="measured"`).

With weight w, GroupNorm maps each head's output o to w * o / RMS(o). At the usual w = 1 it multiplies the raw
outputs of a freshly initialised model (RMS about 0.1 in our small models) by about 10, which is what breaks
associative recall and costs MEA most of its language-modelling gap (docs/scaling.md). Setting w to the raw
outputs' RMS keeps the normalisation but starts it at the scale of what it normalises: the 0.1 found by hand
for those models, measured instead for any model from one batch of its training data.
"""

from __future__ import annotations

import torch

from .configuration_mea import MEASURED

MEASURE_ROWS = 8  # sequences of the batch the measurement reads


def _rms_read_at(model, ids: torch.Tensor, norms: list) -> list[float]:
    """One forward of `ids` (batch, tokens); at each norm in `norms`, the median over tokens and heads of the RMS
    of each head's raw output (the norm's input)."""
    got = []
    hooks = [n.register_forward_pre_hook(lambda _, args: got.append(args[0].pow(2).mean(-1).sqrt().median().item()))
             for n in norms]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return got


def head_output_rms(model, ids: torch.Tensor) -> list[float] | None:
    """Per layer, the median over tokens and heads of the RMS of each head's raw attention output (GroupNorm's
    input) on `ids`; None for a model without GroupNorm."""
    norms = [layer.self_attn.head_norm for layer in model.model.layers]
    return None if any(n is None for n in norms) else _rms_read_at(model, ids, norms)


@torch.no_grad()
def measure_head_norm_init(model, ids: torch.Tensor) -> list[float] | None:
    """For a model configured with mea_head_norm_init="measured": set each layer's GroupNorm weight to the RMS
    of its raw head outputs on the first MEASURE_ROWS rows of `ids`, layer by layer from the first (each layer
    measured on the inputs the earlier, already set, layers give it), and return those values; None (nothing
    changed) for any other model."""
    if model.config.mea_head_norm_init != MEASURED:
        return None
    measured, ids = [], ids[:MEASURE_ROWS]
    for layer in model.model.layers:
        [rms] = _rms_read_at(model, ids, [layer.self_attn.head_norm])
        layer.self_attn.head_norm.weight.fill_(rms)
        measured.append(rms)
    return measured
