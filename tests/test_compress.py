import pytest
import torch
from helpers import incremental_logits, left_padded_batch, randomize_mea, tiny_config

import mea
from mea.compress.calibrate import input_moments, key_moments
from mea.compress.factor_model import factor_model
from mea.compress.factorize import factorize_heads, weighted_error
from mea.compress.plan import (budget_plan, greedy_descent, parse_layers, preset_layers, uniform_plan,
                              width_budget_plan)


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
    assert budget_plan(sens, 3, 3, 0.7, floor=0.5) == [2, 2, 2]  # no layer under 2 of 3 heads (else [3, 1, 2])
    assert budget_plan(sens, 3, 3, 0.7) == [3, 1, 2]
    with pytest.raises(ValueError, match="probe-floor"):
        budget_plan(sens, 3, 3, 0.5, floor=0.5)
    for bad, msg in ((0.0, r"\(0, 1\]"), (1.5, r"\(0, 1\]"), (0.2, "minimum")):
        with pytest.raises(ValueError, match=msg):
            budget_plan(sens, 3, 3, bad)
    with pytest.raises(ValueError, match="h' <= h"):
        uniform_plan(4, 3, 4, [0])
    with pytest.raises(ValueError, match="outside"):
        parse_layers("0-9", 8)


def test_greedy_descent_takes_the_cheapest_loss_per_unit_saved():
    options = [[(4, 0.0), (2, 1.0), (1, 9.0)],  # 0.5 per unit, then 8
               [(4, 0.0), (3, 0.2), (1, 0.6)]]  # 0.2 per unit, then 0.2
    assert greedy_descent(options, 8) == [0, 0]
    assert greedy_descent(options, 7) == [0, 1]
    assert greedy_descent(options, 5) == [0, 2]  # layer 1 all the way down before layer 0's 0.5 per unit
    assert greedy_descent(options, 3) == [1, 2]
    with pytest.raises(ValueError, match="below"):
        greedy_descent(options, 1)


def test_width_budget_plan_gives_sensitive_layers_more_width():
    splits = {l: {48: (2, 16), 32: (1, 16), 16: None} for l in range(3)}
    splits = {l: {w: kv for w, kv in row.items() if kv} for l, row in splits.items()}
    sens = {0: {48: 5.0, 32: 9.0}, 1: {48: 0.1, 32: 0.2}, 2: {48: 0.1, 32: 0.3}}
    plan = width_budget_plan(sens, splits, 3, 16, 32 * 3 / (3 * 96) + 64 / 288, value_latent=True)
    assert plan[0] == (3, 48) and plan[1] == plan[2] == (1, 16)  # 96 + 32 + 32 floats
    with pytest.raises(ValueError, match="below what the probed widths reach"):
        width_budget_plan(sens, splits, 3, 16, 0.2, value_latent=True)
    # a floor of half the cache leaves layers 1 and 2 at 48 floats, so layer 0 gives up its width instead
    floored = width_budget_plan(sens, splits, 3, 16, 0.5, value_latent=True, floor=0.5)
    assert floored == [(2, 16), (2, 16), (2, 16)]
    with pytest.raises(ValueError, match="lower --probe-floor"):
        width_budget_plan(sens, splits, 3, 16, 0.4, value_latent=True, floor=0.5)


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


@pytest.fixture(scope="module")
def qk_norm_model():
    """A tiny QK-norm (Qwen3-like) model whose key norms have far-from-uniform per-feature scales."""
    torch.manual_seed(0)
    model = randomize_mea(mea.MEAForCausalLM(tiny_config(use_qk_norm=True, mea_head_norm=False))).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_norm.weight.copy_(torch.randn(layer.self_attn.head_dim).mul(0.8).exp())
    windows = torch.randint(0, 97, (8, 32))
    return model, windows, input_moments(model, windows), key_moments(model, windows)


def _layer_inputs(model, ids) -> dict:
    seen = {}
    hooks = [layer.self_attn.register_forward_pre_hook(lambda m, a, kw, i=i: seen.__setitem__(i, a[0]),
                                                       with_kwargs=True) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return seen


def _seen_key_error(attn, new, x) -> float:
    """Relative error of the composite keys as the attention sees them: g * k_j / RMS(k_j) of the original."""
    from mea.ops import inverse_rms

    k, kn = attn.composite_kv(x)[0], new.composite_kv(x)[0]
    scale = attn.k_norm.weight * inverse_rms(k, attn.k_norm.eps)[..., None]
    return ((kn - k) * scale).norm().item() / (k * scale).norm().item()


def test_qk_norm_compression_is_exact_at_full_rank(qk_norm_model):
    from mea.compress.factor_model import factor_attention
    from mea.ops import rope_cos_sin

    model, _, moments, keys = qk_norm_model
    attn = model.model.layers[0].self_attn
    new, row = factor_attention(attn, 3, sigma=moments[0], key_stats=keys[0])
    assert row["k_error"] < 1e-10 and row["v_error"] < 1e-10
    x = torch.randn(2, 5, 96)
    cos, sin = rope_cos_sin(model.model.inv_freq, torch.arange(5)[None].expand(2, 5), 1.0, x.dtype)
    with torch.no_grad():
        assert (new(x, cos, sin) - attn(x, cos, sin)).abs().max() < 1e-4
    with pytest.raises(ValueError, match="QK-norm.*key moments"):
        factor_attention(attn, 2, sigma=moments[0])


@pytest.mark.parametrize("key_weighting", [False, True])
def test_qk_norm_objective_lowers_the_key_error_the_attention_sees(qk_norm_model, monkeypatch, key_weighting):
    """With the key norm's scale and 1/RMS in the objective, the normalised keys are closer to the original's
    at every layer and h' than with the un-normalised objective (the previous behaviour)."""
    import mea.compress.factor_model as fm

    model, windows, moments, keys = qk_norm_model
    inputs = _layer_inputs(model, windows)
    fixed = {(i, m): fm.factor_attention(layer.self_attn, m, sigma=moments[i], key_stats=keys[i],
                                         key_weighting=key_weighting)[0]
             for i, layer in enumerate(model.model.layers) for m in (1, 2)}
    monkeypatch.setattr(fm, "key_norm_objective", lambda attn, q_k, stats: (stats[0], q_k))
    for (i, m), new in fixed.items():
        attn = model.model.layers[i].self_attn
        old = fm.factor_attention(attn, m, sigma=moments[i], key_stats=(moments[i], None), key_weighting=key_weighting)[0]
        with torch.no_grad():
            assert _seen_key_error(attn, new, inputs[i]) < _seen_key_error(attn, old, inputs[i]), (i, m)


def test_probe_resumes_from_its_progress_file(tmp_path):
    """A probe killed after its first layer keeps that layer's measurements and measures only the rest when
    rerun; the result equals an uninterrupted probe's. Another model or option set starts afresh."""
    from mea.compress.probe import ProbeLoss, probe_layers

    torch.manual_seed(0)
    model = randomize_mea(mea.MEAForCausalLM(tiny_config())).eval()
    ids = torch.randint(0, 97, (2, 32))
    calls = []

    def loss(m, fail_at=None):
        calls.append(1)
        if len(calls) == fail_at:
            raise KeyboardInterrupt  # the probe killed midway
        with torch.no_grad():
            return m(input_ids=ids, labels=ids).loss.item()

    levels, quiet = [1, 2], (lambda *_: None)
    full = probe_layers(model, ProbeLoss("text", loss, 62), None, levels=levels, method="svd", log=quiet)
    progress, fingerprint = tmp_path / "probe.json", {"source": "tiny"}
    calls.clear()
    dying = ProbeLoss("text", lambda m: loss(m, fail_at=2 + len(levels)), 62)  # base, layer 0, then killed
    with pytest.raises(KeyboardInterrupt):
        probe_layers(model, dying, None, levels=levels, method="svd", progress=progress, fingerprint=fingerprint,
                     log=quiet)
    calls.clear()
    resumed = probe_layers(model, ProbeLoss("text", loss, 62), None, levels=levels, method="svd", progress=progress,
                           fingerprint=fingerprint, log=quiet)
    assert len(calls) == 1 + len(levels)  # the base loss and layer 1 only
    assert resumed["delta_loss"] == full["delta_loss"]
    calls.clear()
    probe_layers(model, ProbeLoss("text", loss, 62), None, levels=levels, method="svd", progress=progress,
                 fingerprint={"source": "another"}, log=quiet)
    assert len(calls) == 1 + 2 * len(levels)  # nothing reused
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(2)  # another model: its uncompressed loss differs
    calls.clear()
    probe_layers(model, ProbeLoss("text", loss, 62), None, levels=levels, method="svd", progress=progress,
                 fingerprint={"source": "another"}, log=quiet)
    assert len(calls) == 1 + 2 * len(levels)


def test_probe_replays_each_layers_input_and_measures_what_the_full_model_does():
    """Each layer's probe pass starts from its recorded input (layers before it run only in the uncompressed
    pass) and gives the loss change of the whole model with that layer compressed."""
    from mea.compress.factor_model import factor_attention
    from mea.compress.probe import ProbeLoss, probe_layers

    torch.manual_seed(1)
    model = randomize_mea(mea.MEAForCausalLM(tiny_config())).eval()
    windows = [torch.randint(0, 97, (2, 32)), torch.randint(0, 97, (1, 48))]  # two sequence batches per loss

    def loss(m):
        with torch.no_grad():
            return sum(m(input_ids=ids, labels=ids).loss.item() for ids in windows)

    runs = [0] * model.config.num_hidden_layers
    hooks = [layer.register_forward_pre_hook(lambda mod, args, i=i: runs.__setitem__(i, runs[i] + 1))
             for i, layer in enumerate(model.model.layers)]
    result = probe_layers(model, ProbeLoss("text", loss, 110), None, levels=[1, 2], method="svd", log=lambda *_: None)
    for h in hooks:
        h.remove()
    assert runs == [2 * (1 + 2), 2 * (1 + 2 + 2)]  # layer 0: base + its own 2 levels; layer 1 also layer 0's
    base = loss(model)
    for layer, block in enumerate(model.model.layers):
        original = block.self_attn
        for m in (1, 2):
            block.self_attn, _ = factor_attention(original, m, method="svd")
            naive = loss(model) - base
            block.self_attn = original
            assert result["delta_loss"][layer][m] == pytest.approx(naive, abs=1e-6)
            assert abs(naive) > 1e-4  # the layer's compression changes the loss: the check can fail
