"""The finer KV factorisations: complex per-RoPE-pair key mixing, a value latent of any width, separate
key/value component counts; their absorbed decode, cache and factorisation."""

import pytest
import torch
from helpers import incremental_logits, left_padded_batch, padding_mask, randomize_mea, tiny_config

import mea
from mea.compress.calibrate import input_moments
from mea.compress.factor_model import error_curves, factor_attention, factor_model
from mea.compress.factorize import relative_error
from mea.compress.factorize_fine import factorize_latent, factorize_rope_pairs
from mea.compress.plan import width_plan
from mea.ops import (
    absorbed_attention,
    absorbed_attention_reference,
    apply_rope,
    fold_mixing,
    mix,
    mix_pairs_reference,
    rope_cos_sin,
    rope_inv_freq,
)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def _cos_sin(b, t, d, offset=0):
    inv_freq, scaling = rope_inv_freq({"rope_type": "default", "rope_theta": 10_000.0}, d, 2048)
    pos = torch.randint(0, 500, (b, 1)) + torch.arange(t)[None] + offset
    return rope_cos_sin(inv_freq, pos, scaling, torch.float64)


def test_rope_pair_mixing_matches_complex_reference_and_commutes_with_rope():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 2, 8, dtype=torch.float64)
    w = torch.randn(2, 3, 2, 4, dtype=torch.float64)
    assert rel_err(mix(x, w, "rope_pair"), mix_pairs_reference(x, w)) < 1e-12
    cos, sin = _cos_sin(2, 5, 8)
    rotate_then_mix = mix(apply_rope(x, cos, sin), w, "rope_pair")
    mix_then_rotate = apply_rope(mix(x, w, "rope_pair"), cos, sin)
    assert rel_err(rotate_then_mix, mix_then_rotate) < 1e-12
    # a real (head-level) weight is the special case with zero imaginary parts
    w_real = torch.randn(2, 3, dtype=torch.float64)
    as_pairs = torch.stack([w_real[..., None].expand(2, 3, 4), torch.zeros(2, 3, 4, dtype=torch.float64)], dim=2)
    assert rel_err(mix(x, as_pairs, "rope_pair"), mix(x, w_real, "head")) < 1e-12
    # and a nonzero imaginary part does not commute with a per-feature scale that differs within a pair
    g = torch.rand(8, dtype=torch.float64) + 0.5
    assert rel_err(mix(x * g, w, "rope_pair"), mix(x, w, "rope_pair") * g) > 1e-3


@pytest.mark.parametrize("kind,shape,width", [("head", (2, 3), 16), ("rope_pair", (2, 3, 2, 4), 16),
                                              ("latent", (5, 3, 8), 5)])
def test_fold_mixing_equals_mixing_the_projection_output(kind, shape, width):
    torch.manual_seed(1)
    weight, bias, w = torch.randn(width, 7), torch.randn(width), torch.randn(shape)
    x = torch.randn(2, 4, 7)
    folded_w, folded_b = fold_mixing(weight, bias, w, kind, 8)
    per = width if kind == "latent" else 8
    direct = mix((x @ weight.T + bias).view(2, 4, width // per, per), w, kind)
    assert rel_err((x @ folded_w.T + folded_b).view(2, 4, 3, 8), direct) < 1e-6


@pytest.mark.parametrize("key_mixing,value_mixing", [("head", "head"), ("rope_pair", "head"), ("head", "latent"),
                                                     ("rope_pair", "latent")])
@pytest.mark.parametrize("t", [1, 3])
def test_absorbed_attention_equals_expanded_forward_and_grad(key_mixing, value_mixing, t):
    torch.manual_seed(2)
    b, s, n, h, d, m_k = 3, 9, 6, 3, 8, 2
    q = torch.randn(b, t, n, d, requires_grad=True)
    k = torch.randn(b, s, m_k, d, requires_grad=True)
    wk = torch.randn((m_k, h, 2, d // 2) if key_mixing == "rope_pair" else (m_k, h), requires_grad=True)
    if value_mixing == "latent":  # a latent of 11 floats: not a whole number of heads
        v, wv = torch.randn(b, s, 1, 11, requires_grad=True), torch.randn(11, h, d, requires_grad=True)
    else:  # one value component with two key components: separate counts
        v, wv = torch.randn(b, s, 1, d, requires_grad=True), torch.randn(1, h, requires_grad=True)
    mask = padding_mask(b, t, s, [s, 5, 2])  # left padding
    kw = dict(mask=mask, scale=d**-0.5, key_mixing=key_mixing, value_mixing=value_mixing)
    out = absorbed_attention(q, k, v, wk, wv, **kw)
    ref = absorbed_attention_reference(q, k, v, wk, wv, **kw)
    assert out.shape == (b, t, n, d)
    assert rel_err(out, ref) < 1e-5
    g = torch.randn_like(out)
    inputs = (q, k, v, wk, wv)
    for a, r in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g)):
        assert rel_err(a, r) < 1e-5


def _random_layer_weights(h=3, d=8, c=13, samples=400):
    w = torch.randn(h, d, c, dtype=torch.float64)
    x = torch.randn(samples, c, dtype=torch.float64) * torch.logspace(-1, 1, c, dtype=torch.float64)
    return w, x.T @ x / samples


def test_rope_pair_factorisation_exact_at_full_rank_and_its_error_curve_is_the_real_error():
    torch.manual_seed(3)
    w, sigma = _random_layer_weights()
    weights = torch.rand(3, 4, dtype=torch.float64) + 0.2
    q = torch.diag_embed(torch.cat([weights, weights], dim=1))  # the pair weights as a (h, D, D) metric
    errors = []
    for m in (1, 2, 3):
        comp, mixing, curve = factorize_rope_pairs(w, sigma, m, pair_weights_hP=weights)
        approx = fold_mixing(comp.reshape(-1, 13), None, mixing, "rope_pair", 8)[0].view(3, 8, 13)
        errors.append(relative_error(w, approx, sigma, q))
        assert abs(errors[-1] - curve[m]) < 1e-9
    assert errors[-1] < 1e-20 and errors[0] > errors[1] > errors[2]
    # finer than head-level mixing at the same cache size, on the same objective
    from mea.compress.factorize import factorize_heads, weighted_error
    v, a = factorize_heads(w, sigma, 2, q_hDD=q)
    assert errors[1] < weighted_error(w, v, a, sigma, q)


def test_value_latent_exact_at_full_width_and_optimal_on_its_objective():
    torch.manual_seed(4)
    w, sigma = _random_layer_weights()
    o = torch.randn(3, 8, 8, dtype=torch.float64)
    q = o @ o.transpose(1, 2) + 0.1 * torch.eye(8, dtype=torch.float64)
    for r in (5, 12, 24):
        a, b, curve = factorize_latent(w, sigma, r, q_hDD=q)
        approx = torch.einsum("rc,rhd->hdc", a, b)
        err = relative_error(w, approx, sigma, q)
        assert abs(err - curve[r]) < 1e-9
    assert err < 1e-20
    # weighting through W_O lowers the error it weighs, against the unweighted latent of the same width
    a_u, b_u, _ = factorize_latent(w, sigma, 12)
    a_w, b_w, _ = factorize_latent(w, sigma, 12, q_hDD=q)
    assert relative_error(w, torch.einsum("rc,rhd->hdc", a_w, b_w), sigma, q) < \
        relative_error(w, torch.einsum("rc,rhd->hdc", a_u, b_u), sigma, q)


FINE = dict(mea_key_mixing="rope_pair", mea_value_mixing="latent", mea_num_key_components=[2, 1],
            mea_value_latent_dim=[20, 40])


@pytest.mark.parametrize("fields", [FINE, dict(mea_num_key_components=[1, 2], mea_num_value_components=[2, 1]),
                                    dict(mea_key_mixing="rope_pair", mea_num_component_heads=2)])
def test_cached_decoding_equals_uncached_with_left_padding(fields):
    torch.manual_seed(5)
    model = randomize_mea(mea.MEAForCausalLM(tiny_config(**fields))).eval()
    ids, mask = left_padded_batch(97, lengths=(9, 6, 3))
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False).logits
        inc, cache = incremental_logits(model, ids, mask, prefill=4)
    real = mask.bool()
    assert rel_err(inc[real], full[real]) < 1e-4
    assert all(layer.cache_layout.absorbed for layer in (b.self_attn for b in model.model.layers))
    # bytes held == the configuration's prediction
    assert cache.bytes_used() == 3 * 9 * model.config.kv_cache_bytes_per_token(bytes_per_element=4)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, use_cache=True, **kw), model.generate(ids, use_cache=False, **kw))


def test_separate_counts_and_finer_mixings_round_trip_through_save_load(tmp_path):
    torch.manual_seed(6)
    model = randomize_mea(mea.MEAForCausalLM(tiny_config(**FINE))).eval()
    model.save_pretrained(tmp_path)
    loaded = mea.MEAForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.key_components() == [2, 1] and loaded.config.value_latent_dims() == [20, 40]
    assert loaded.config.mea_key_mixing == "rope_pair" and loaded.config.mea_value_mixing == "latent"
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    d = model.config.head_dim
    assert model.config.kv_cache_bytes_per_token(2) == 2 * ((2 * d + 20) + (1 * d + 40))


@pytest.mark.parametrize("fields,message", [
    (dict(use_qk_norm=True, mea_key_mixing="rope_pair"), "QK-norm"),
    (dict(mea_value_mixing="latent"), "mea_value_latent_dim"),
    (dict(mea_value_latent_dim=16), "latent"),
    (dict(mea_value_mixing="latent", mea_value_latent_dim=49), r"\[1, h\*D=48\]"),
    (dict(mea_num_key_components=4), "h'_K"),
    (dict(mea_hlc=False, mea_num_value_components=2), "hlc"),
    (dict(mea_key_mixing="complex"), "key mixing"),
    (dict(mea_value_mixing="latent", mea_value_latent_dim=8, mea_num_value_components=2), "latent"),
])
def test_config_refuses_impossible_caches(fields, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**fields)


@pytest.fixture(scope="module")
def calibrated():
    torch.manual_seed(0)
    model = randomize_mea(mea.MEAForCausalLM(tiny_config(attention_bias=True, mea_head_norm=False))).eval()
    windows = torch.randint(0, 97, (4, 32))
    return model, input_moments(model, windows)


@pytest.mark.parametrize("method", ["rope-pair", "rope-pair-latent"])
def test_full_rank_finer_factorisation_reproduces_the_layer(calibrated, method):
    model, moments = calibrated
    attn = model.model.layers[0].self_attn
    new, row = factor_attention(attn, 3, method=method, sigma=moments[0])
    assert row["k_error"] < 1e-10 and row["v_error"] < 1e-10 and row["k_rel_error"] < 1e-10
    x = torch.randn(2, 5, 96)
    cos, sin = rope_cos_sin(model.model.inv_freq, torch.arange(5)[None].expand(2, 5), 1.0, x.dtype)
    with torch.no_grad():
        assert rel_err(new(x, cos, sin), attn(x, cos, sin)) < 1e-5


def test_finer_factorisation_beats_head_level_and_decodes_exactly(calibrated):
    model, moments = calibrated
    attn = model.model.layers[1].self_attn
    _, head = factor_attention(attn, 2, method="whitened", sigma=moments[1])
    _, fine = factor_attention(attn, 2, method="rope-pair-latent", sigma=moments[1])
    assert fine["k_error"] < head["k_error"] and fine["v_error"] < head["v_error"]
    # a budget that is not whole heads: (1 key component, a 40-float value latent)
    compressed, report = factor_model(model, [(1, 40), 2], method="rope-pair-latent", moments=moments)
    assert compressed.config.value_latent_dims() == [40, 32] and len(report) == 2
    ids, mask = left_padded_batch(97, lengths=(8, 5))
    with torch.no_grad():
        full = compressed(ids, attention_mask=mask, use_cache=False).logits
        inc, _ = incremental_logits(compressed, ids, mask, prefill=3)
    assert rel_err(inc[mask.bool()], full[mask.bool()]) < 1e-4


def test_width_plan_splits_each_layer_by_its_error_curves(calibrated):
    model, moments = calibrated
    curves = [error_curves(layer.self_attn, moments[i], "rope-pair-latent")
              for i, layer in enumerate(model.model.layers)]
    assert all(len(c["key"]) == 4 and len(c["value"]) == 49 for c in curves)
    plan = width_plan(curves, 3, 16, 0.5, value_latent=True)
    for (k, r), c in zip(plan, curves):
        assert k * 16 + r == 48
        assert c["key"][k] + c["value"][r] == min(c["key"][j] + c["value"][48 - 16 * j] for j in (1, 2))
    with pytest.raises(ValueError, match="too few"):
        width_plan(curves, 3, 16, 0.1, value_latent=True)


def test_head_level_error_curves_give_separate_key_and_value_counts(calibrated):
    model, moments = calibrated
    curves = [error_curves(layer.self_attn, moments[i], "whitened") for i, layer in enumerate(model.model.layers)]
    for c in curves:
        assert len(c["key"]) == len(c["value"]) == 4 and c["key"][3] == 0 and c["key"][0] == 1
        assert c["key"][1] >= c["key"][2] and c["value"][1] >= c["value"][2]
    plan = width_plan(curves, 3, 16, 0.5, value_latent=False)  # 3 of 6 heads per layer: (2, 1) or (1, 2)
    assert all(k + v == 3 and k >= 1 and v >= 1 for k, v in plan)
    compressed, _ = factor_model(model, plan, method="whitened", moments=moments)
    assert compressed.config.key_components() == [k for k, _ in plan]
    assert compressed.config.value_components() == [v for _, v in plan]
    assert compressed.config.kv_cache_bytes_per_token(2) == 2 * 2 * 3 * 16 * 2 // 2


def test_benchmark_reads_the_layers_dispatch():
    from mea.bench.systems import decode_kernels, fill_cache, predicted_kv_bytes

    torch.manual_seed(7)
    model = mea.MEAForCausalLM(tiny_config(mea_key_mixing="rope_pair", mea_value_mixing="latent",
                                           mea_num_key_components=[3, 1], mea_value_latent_dim=[48, 24])).eval()
    layouts = model.config.cache_layouts()
    assert [layout.kernel for layout in layouts] == ["grouped", "absorbed"]  # layer 0 keeps every float: plain GQA
    assert [b.self_attn.cache_layout for b in model.model.layers] == layouts
    assert decode_kernels(model) == {"absorbed": 1, "grouped": 1}
    cache = fill_cache(model, batch=2, context=10, capacity=16)
    assert cache.bytes_held() == predicted_kv_bytes(model, 2, 16)
    assert cache.layers[1].keys.shape == (2, 16, 1, 16) and cache.layers[1].values.shape == (2, 16, 1, 24)
    assert cache.layers[0].heads_first and not cache.layers[1].heads_first
    with torch.no_grad():
        out = model(torch.randint(0, 97, (2, 1)), cache=cache, use_cache=True)
    assert out.logits.shape == (2, 1, 97) and cache.get_seq_length() == 11


def test_qk_norm_models_refuse_per_pair_key_mixing():
    model = mea.MEAForCausalLM(tiny_config(use_qk_norm=True)).eval()
    with pytest.raises(ValueError, match="QK-norm"):
        factor_attention(model.model.layers[0].self_attn, 2, method="rope-pair", sigma=torch.eye(97, dtype=torch.float64))
    from mea.compress.pipeline import CompressOptions, compress_model
    with pytest.raises(ValueError, match="QK-norm"):
        compress_model(model, None, CompressOptions(method="rope-pair-latent", kv_budget=0.5))
