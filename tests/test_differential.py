"""Differential attention: the layer against a per-head reference written from the paper's formulas
(forward and gradients), and cached decoding against the full forward."""

import math

import pytest
import torch

import mea
from helpers import incremental_logits, left_padded_batch, randomize_mea, tiny_config
from mea.layers import DifferentialAttention
from mea.layers.differential import lambda_init_for


def _reference(layer: DifferentialAttention, x: torch.Tensor) -> torch.Tensor:
    """softmax(q1 k1) v - lambda softmax(q2 k2) v per differential head, RMSNorm over 2D, (1 - lambda_init)."""
    b, t, _ = x.shape
    n, h, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q = layer.q_proj(x).view(b, t, n // 2, 2, d)
    k = layer.k_proj(x).view(b, t, h // 2, 2, d)
    v = layer.v_proj(x).view(b, t, h // 2, 2 * d)
    lam_init = 0.8 - 0.6 * math.exp(-0.3 * layer.layer_idx)
    lam = (torch.exp((layer.lambda_q1 * layer.lambda_k1).sum()) - torch.exp((layer.lambda_q2 * layer.lambda_k2).sum())
           + lam_init)
    causal = torch.ones(t, t, dtype=torch.bool).tril()

    def softmax_map(qq, kk):
        scores = qq @ kk.transpose(-1, -2) / math.sqrt(d)
        return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)

    heads = []
    for j in range(n // 2):
        g = j // ((n // 2) // (h // 2))  # the KV group of differential head j
        a = softmax_map(q[:, :, j, 0], k[:, :, g, 0]) @ v[:, :, g] - lam * softmax_map(q[:, :, j, 1], k[:, :, g, 1]) @ v[:, :, g]
        a = a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + layer.head_norm.eps) * layer.head_norm.weight
        heads.append(a * (1 - lam_init))
    return layer.o_proj(torch.cat(heads, dim=-1))


def test_lambda_init_follows_depth():
    assert lambda_init_for(0) == pytest.approx(0.2)
    assert lambda_init_for(10) == pytest.approx(0.8 - 0.6 * math.exp(-3.0))


@pytest.mark.parametrize("heads,kv", [(8, 8), (8, 4), (8, 2)])
def test_forward_and_gradients_match_reference(heads, kv):
    layer = DifferentialAttention(hidden_size=64, num_heads=heads, num_kv_heads=kv, head_dim=16, hlc=False,
                                  head_norm=True, layer_idx=3).double()
    with torch.no_grad():
        layer.head_norm.weight.add_(0.3 * torch.randn_like(layer.head_norm.weight))
    x = torch.randn(2, 11, 64, dtype=torch.double, requires_grad=True)
    cos = torch.ones(2, 11, 1, 16, dtype=torch.double)  # RoPE off: the reference has none
    sin = torch.zeros(2, 11, 1, 16, dtype=torch.double)
    out, ref = layer(x, cos, sin), _reference(layer, x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *layer.parameters()], g)
    grads_ref = torch.autograd.grad(ref, [x, *layer.parameters()], g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_cached_decoding_matches_full_forward_with_left_padding():
    model = randomize_mea(mea.MEAForCausalLM(tiny_config(mea_hlc=False, mea_differential=True,
                                                         num_key_value_heads=2)).eval())
    ids, mask = left_padded_batch(97, lengths=(9, 5, 3))
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        inc, _ = incremental_logits(model, ids, mask, prefill=4)
    real = mask.bool()
    torch.testing.assert_close(inc[real], full[real], rtol=1e-4, atol=1e-5)


def test_invalid_differential_configs():
    with pytest.raises(ValueError, match="mea_hlc=False"):
        tiny_config(mea_differential=True, num_key_value_heads=2)  # HLC on by default
    with pytest.raises(ValueError, match="even head counts"):
        tiny_config(mea_differential=True, mea_hlc=False)  # tiny has 3 KV heads
