import pytest
import torch
from helpers import incremental_logits, left_padded_batch, randomize_mea, tiny_config

import mea
from mea.compress.calibrate import input_moments
from mea.compress.factor_model import factor_model
from mea.compress.factorize import factorize_heads, weighted_error
from mea.compress.plan import budget_plan, parse_layers, preset_layers, uniform_plan


def test_factorize_full_rank_is_exact_and_error_non_increasing():
    torch.manual_seed(1)
    w = torch.randn(4, 6, 11, dtype=torch.float64)
    x = torch.randn(300, 11, dtype=torch.float64) @ torch.randn(11, 11, dtype=torch.float64)
    sigma = x.T @ x
    q = torch.diag_embed(torch.rand(4, 6, dtype=torch.float64) + 0.1)
    for weights in (None, q):
        errors = []
        for m in range(1, 5):
            v, a = factorize_heads(w, sigma, m, q_hDD=weights)
            errors.append(weighted_error(w, v, a, sigma, weights))
        assert errors[-1] < 1e-20
        assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:]))


def test_whitened_factorisation_beats_data_free_on_its_objective():
    torch.manual_seed(2)
    w = torch.randn(3, 5, 9, dtype=torch.float64)
    x = torch.randn(200, 9, dtype=torch.float64) * torch.logspace(-2, 1, 9, dtype=torch.float64)
    sigma = x.T @ x
    v_w, a_w = factorize_heads(w, sigma, 1)
    v_s, a_s = factorize_heads(w, torch.eye(9, dtype=torch.float64), 1)
    assert weighted_error(w, v_w, a_w, sigma) < weighted_error(w, v_s, a_s, sigma)


@pytest.fixture(scope="module")
def calibrated():
    torch.manual_seed(0)
    model = randomize_mea(mea.MEAForCausalLM(tiny_config(attention_bias=True, mea_head_norm=False))).eval()
    windows = torch.randint(0, 97, (4, 32))
    moments = input_moments(model, windows)
    return model, moments


@pytest.mark.parametrize("method", ["whitened", "svd"])
def test_full_rank_compression_is_exact(calibrated, method):
    """h' = h through a real factorisation (the HLC matrices are random, not identity)."""
    from mea.compress.factor_model import factor_attention
    from mea.ops import rope_cos_sin

    model, moments = calibrated
    attn = model.model.layers[0].self_attn
    new, row = factor_attention(attn, 3, method=method, sigma=moments[0])
    assert row["k_error"] < 1e-10 and row["v_error"] < 1e-10
    x = torch.randn(2, 5, 96)
    cos, sin = rope_cos_sin(model.model.inv_freq, torch.arange(5)[None].expand(2, 5), 1.0, x.dtype)
    with torch.no_grad():
        assert (new(x, cos, sin) - attn(x, cos, sin)).abs().max() < 1e-4


def test_compressed_cache_agrees_with_expanded_attention(calibrated):
    model, moments = calibrated
    compressed, report = factor_model(model, [1, 2], moments=moments)
    assert [(r["key_components"], r["value_components"]) for r in report] == [(1, 1), (2, 2)]
    ids, mask = left_padded_batch(97, lengths=(9, 6, 4))
    with torch.no_grad():
        full = compressed(ids, attention_mask=mask).logits
        inc, cache = incremental_logits(compressed, ids, mask, prefill=5)
    assert (inc[mask.bool()] - full[mask.bool()]).abs().max() < 1e-4
    assert [layer.num_heads for layer in cache.layers] == [1, 2]


def test_plans():
    assert parse_layers("0-2,5", 8) == [0, 1, 2, 5]
    assert preset_layers("half", 30) == list(range(7, 23))
    assert preset_layers("deep", 30) == list(range(3, 30))
    assert uniform_plan(4, 3, 2, [1, 2]) == [3, 2, 2, 3]
    sens = {0: {1: 5.0, 2: 1.0}, 1: {1: 0.5, 2: 0.1}, 2: {1: 3.0, 2: 0.2}}
    plan = budget_plan(sens, 3, 3, 0.5)
    assert sum(plan) <= 4.5 and plan[1] == 1
    for bad, msg in ((0.0, r"\(0, 1\]"), (1.5, r"\(0, 1\]"), (0.2, "minimum")):
        with pytest.raises(ValueError, match=msg):
            budget_plan(sens, 3, 3, bad)
    with pytest.raises(ValueError, match="h' <= h"):
        uniform_plan(4, 3, 4, [0])
    with pytest.raises(ValueError, match="outside"):
        parse_layers("0-9", 8)


def test_layerwise_fit_reduces_the_error_it_trains_on(calibrated):
    from mea.compress.recover import layerwise_fit

    model, moments = calibrated
    student, _ = factor_model(model, [1, 1], moments=moments)
    windows = torch.randint(0, 97, (4, 32))
    report = layerwise_fit(student, model, windows, steps=30, lr=3e-3, log=lambda m: None)
    assert [r["layer"] for r in report] == [0, 1]
    for row in report:
        assert row["rel_error_after"] < row["rel_error_before"]


def test_teacher_forced_fit_mode(calibrated):
    from mea.compress.recover import layerwise_fit

    model, moments = calibrated
    student, _ = factor_model(model, [2, 1], moments=moments)
    report = layerwise_fit(student, model, torch.randint(0, 97, (4, 32)), steps=30, lr=3e-3, mode="teacher",
                           log=lambda m: None)
    assert all(r["rel_error_after"] < r["rel_error_before"] for r in report)
    with pytest.raises(ValueError, match="fit mode"):
        layerwise_fit(student, model, torch.randint(0, 97, (4, 32)), mode="bogus")
