import pytest
import torch
import torch.nn.functional as F
from helpers import padding_mask
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from mea.ops import (
    absorbed_attention,
    absorbed_attention_reference,
    apply_rope,
    apply_rope_reference,
    attention_reference,
    expanded_attention,
    grouped_attention,
    mix_heads,
    mix_heads_reference,
    rms_norm,
    rms_norm_reference,
    rope_cos_sin,
    rope_inv_freq,
)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def test_mix_heads_matches_reference_forward_and_grad():
    x = torch.randn(2, 5, 2, 8, requires_grad=True)
    w = torch.randn(2, 3, requires_grad=True)
    out, ref = mix_heads(x, w), mix_heads_reference(x, w)
    assert out.shape == (2, 5, 3, 8)
    assert rel_err(out, ref) < 1e-6
    g = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, w), g)
    rx, rw = torch.autograd.grad(ref, (x, w), g)
    assert rel_err(gx, rx) < 1e-6 and rel_err(gw, rw) < 1e-6


def test_rms_norm_matches_reference():
    x, w = torch.randn(3, 4, 16), torch.randn(16)
    assert rel_err(rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5)) < 1e-6


BF16_ULP = 2.0**-8  # bf16 unit roundoff (8 significant bits)


def test_rms_norm_bf16_values():
    """bf16 in, bf16 out: within two bf16 roundings (the normalised value, then the weight product) of the
    exact result on the same bf16 inputs, element by element."""
    g = torch.Generator().manual_seed(0)
    xb = (3 * torch.randn(4, 7, 64, generator=g)).bfloat16()
    wb = (1 + torch.randn(64, generator=g)).bfloat16()
    out = rms_norm(xb, wb, 1e-6)
    assert out.dtype == torch.bfloat16
    x, w = xb.double(), wb.double()
    exact = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    assert ((out.double() - exact).abs() <= 2 * BF16_ULP * exact.abs() + 1e-30).all()
    assert rel_err(rms_norm_reference(xb, wb, 1e-6), exact) < 2 * BF16_ULP


ROPE_CASES = [
    {"rope_type": "default", "rope_theta": 10_000.0},
    {"rope_type": "linear", "rope_theta": 10_000.0, "factor": 4.0},
    {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 32.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    {"rope_type": "yarn", "rope_theta": 1_000_000.0, "factor": 4.0, "original_max_position_embeddings": 32768},
]


@pytest.mark.parametrize("params", ROPE_CASES, ids=lambda p: p["rope_type"])
def test_rope_frequencies_match_transformers(params):
    cfg = LlamaConfig(hidden_size=128, num_attention_heads=2, head_dim=64, max_position_embeddings=131072,
                      rope_parameters=dict(params))
    fn = ROPE_INIT_FUNCTIONS.get(params["rope_type"])
    if params["rope_type"] == "default":
        ref, ref_scale = 1.0 / (params["rope_theta"] ** (torch.arange(0, 64, 2).float() / 64)), 1.0
    else:
        ref, ref_scale = fn(cfg, "cpu")
    ours, scale = rope_inv_freq(dict(cfg.rope_parameters), 64, 131072)
    assert rel_err(ours, ref) < 1e-6
    assert scale == pytest.approx(ref_scale)


def test_rope_matches_complex_reference_and_commutes_with_mixing():
    inv_freq, scale = rope_inv_freq({"rope_type": "default", "rope_theta": 10_000.0}, 16, 2048)
    pos = torch.tensor([[0, 1, 2, 7, 100]])
    x = torch.randn(1, 5, 2, 16)
    cos, sin = rope_cos_sin(inv_freq, pos, scale, x.dtype)
    assert rel_err(apply_rope(x, cos, sin), apply_rope_reference(x, pos, inv_freq, scale)) < 1e-6
    # mixing before vs after RoPE: the same function
    w = torch.randn(2, 3)
    before = apply_rope(mix_heads(x, w), cos, sin)
    after = mix_heads(apply_rope(x, cos, sin), w)
    assert rel_err(before, after) < 1e-6


@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_absorbed_attention_equals_expanded_forward_and_grad(t, with_scale, masked):
    b, s, n, h, m, d = 2, 9, 6, 3, 2, 8
    q = torch.randn(b, t, n, d, requires_grad=True)
    k = torch.randn(b, s, m, d, requires_grad=True)
    v = torch.randn(b, s, m, d, requires_grad=True)
    wk = torch.randn(m, h, requires_grad=True)
    wv = torch.randn(m, h, requires_grad=True)
    ks = (torch.rand(b, s, h) + 0.5).requires_grad_() if with_scale else None
    mask = padding_mask(b, t, s, [s, 5]) if masked else None
    if mask is None and t > 1:
        mask = padding_mask(b, t, s, [s, s])
    out = absorbed_attention(q, k, v, wk, wv, mask=mask, scale=d**-0.5, k_scale_BSH=ks)
    ref = absorbed_attention_reference(q, k, v, wk, wv, mask=mask, scale=d**-0.5, k_scale_BSH=ks)
    assert rel_err(out, ref) < 1e-5
    inputs = [x for x in (q, k, v, wk, wv, ks) if x is not None]
    g = torch.randn_like(out)
    for a, r in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g)):
        assert rel_err(a, r) < 1e-5


def test_grouped_and_expanded_attention_match_reference():
    b, s, n, h, d = 2, 7, 6, 3, 8
    q, k, v = torch.randn(b, s, n, d), torch.randn(b, s, h, d), torch.randn(b, s, h, d)
    mask = padding_mask(b, s, s, [7, 3])
    for m in (None, mask):
        assert rel_err(expanded_attention(q, k, v, mask=m, scale=0.3), attention_reference(q, k, v, mask=m, scale=0.3)) < 1e-5
    q1 = q[:, -2:]
    m2 = padding_mask(b, 2, s, [7, 3])
    ref = attention_reference(q1, k, v, mask=m2, scale=0.3)
    assert rel_err(grouped_attention(q1, k, v, mask=m2, scale=0.3), ref) < 1e-5


def test_absorbed_decode_with_k_scale_bf16_values():
    """The QK-norm path of the absorbed decode (a per-key logit factor, two matmuls) in bf16: within 2% (five
    bf16 roundings: query scaling, logits, logit factor, probabilities, values) of the float64 reference on
    the same bf16 inputs (the float32 path on those inputs: within 1e-5)."""
    g = torch.Generator().manual_seed(0)
    b, t, s, n, h, m, d = 2, 1, 40, 6, 3, 2, 16
    q, k, v = (torch.randn(b, x, c, d, generator=g).bfloat16() for x, c in ((t, n), (s, m), (s, m)))
    wk, wv = torch.randn(m, h, generator=g).bfloat16(), torch.randn(m, h, generator=g).bfloat16()
    ks = (torch.rand(b, s, h, generator=g) + 0.5).bfloat16()
    mask = padding_mask(b, t, s, [s, 25])
    args = dict(mask=mask, scale=d**-0.5)
    ref = absorbed_attention_reference(*(x.double() for x in (q, k, v, wk, wv)), **args, k_scale_BSH=ks.double())
    out = absorbed_attention(q, k, v, wk, wv, **args, k_scale_BSH=ks)
    assert out.dtype == torch.bfloat16
    fp32 = absorbed_attention(*(x.float() for x in (q, k, v, wk, wv)), **args, k_scale_BSH=ks.float())
    assert rel_err(fp32, ref) < 1e-5
    assert rel_err(out, ref) < 5 * BF16_ULP
    # masked keys stay masked in bf16: the padded sequence ignores its first 15 keys
    shifted = absorbed_attention(q, k.clone().index_fill_(1, torch.arange(15), 100.0), v, wk, wv, **args,
                                 k_scale_BSH=ks)
    assert torch.equal(shifted[1], out[1])


@pytest.mark.parametrize("batch,heads,keys", [(1, 1, 4100), (1, 3, 2500), (2, 1, 3000)])
def test_split_decode_equals_sdpa(batch, heads, keys):
    """The flash-decoding split (chunks of the cache merged by log-sum-exp, with a tail chunk) is exact,
    and these inputs do take the split path (not SDPA compared with itself)."""
    from mea.ops.attention import _FLASH_CPU, decode_sdpa, decode_splits

    if _FLASH_CPU is None:
        pytest.skip("this torch build has no CPU flash-attention op: decode_sdpa always calls SDPA")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, n, 32, generator=g) for n in (6, keys, keys))
    with torch.no_grad():
        assert decode_splits(q, k, v, mask=None) >= 2
        out = decode_sdpa(q, k, v, mask=None, scale=0.2)
        assert rel_err(out, F.scaled_dot_product_attention(q, k, v, scale=0.2)) < 1e-5
        mask = torch.ones(batch, 1, 6, keys, dtype=torch.bool)
        assert decode_splits(q, k, v, mask=mask) == 1  # a mask: one SDPA call
    assert decode_splits(q.requires_grad_(), k, v, mask=None) == 1  # gradients: one SDPA call
