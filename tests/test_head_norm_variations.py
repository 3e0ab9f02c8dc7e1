"""GroupNorm's variations (a gain per head, no per-feature weight, a learned blend, the weight's initial
value): each matches a hand-written reference in value and gradients, round-trips through save/load, and is
refused where it means nothing; the recall study runs, resumes and reports them."""

import json

import pytest
import torch

from mea import MEAConfig
from mea.experiments import recall_study as rs
from mea.layers import MEAAttention
from mea.models import MEAForCausalLM, make_config

OPTIONS = {
    "gain": dict(head_gain=True),
    "no-weight": dict(head_norm_weight=False),
    "blend": dict(head_norm_blend=True),
    "all": dict(head_gain=True, head_norm_weight=False, head_norm_blend=True),
}


def reference(out, *, weight, eps, gain=None, blend=None):
    """Per head: o / rms(o) * w, blended (1 - a) o + a (...), times g; one a and one g per head."""
    normed = out / torch.sqrt(out.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        normed = normed * weight
    if blend is not None:
        normed = (1 - blend[:, None]) * out + blend[:, None] * normed
    if gain is not None:
        normed = normed * gain[:, None]
    return normed


@pytest.mark.parametrize("name", list(OPTIONS))
def test_matches_the_reference_in_value_and_gradients(name):
    torch.manual_seed(0)
    attn = MEAAttention(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, **OPTIONS[name]).double()
    with torch.no_grad():  # away from the init, so that each parameter matters
        for p in (attn.head_norm.weight, attn.head_gain, attn.head_norm_blend):
            if p is not None:
                p.uniform_(0.2, 1.5)
    out = torch.randn(2, 5, 4, 8, dtype=torch.float64, requires_grad=True)
    got = attn.combine_heads(out)
    params = {"weight": attn.head_norm.weight, "gain": attn.head_gain, "blend": attn.head_norm_blend}
    ref_params = {k: None if p is None else p.detach().clone().requires_grad_() for k, p in params.items()}
    want = reference(out.detach().clone().requires_grad_(), eps=attn.head_norm.eps, **ref_params)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(got)
    ref_in = out.detach().clone().requires_grad_()
    want = reference(ref_in, eps=attn.head_norm.eps, **ref_params)
    (got * upstream).sum().backward()
    (want * upstream).sum().backward()
    torch.testing.assert_close(out.grad, ref_in.grad, rtol=1e-10, atol=1e-12)
    for k, p in params.items():
        assert (p is None) == (ref_params[k] is None)
        if p is not None:
            torch.testing.assert_close(p.grad, ref_params[k].grad, rtol=1e-10, atol=1e-12)


def test_initial_values_leave_groupnorm_or_the_raw_output():
    out = torch.randn(2, 3, 4, 8)
    plain = MEAAttention(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8)
    gain = MEAAttention(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, head_gain=True)
    blend = MEAAttention(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, head_norm_blend=True)
    torch.testing.assert_close(gain.combine_heads(out), plain.combine_heads(out))  # g = 1: GroupNorm
    torch.testing.assert_close(blend.combine_heads(out), out)  # a = 0: no norm yet
    scaled = MEAAttention(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, head_norm_init=0.2)
    torch.testing.assert_close(scaled.combine_heads(out), 0.2 * plain.combine_heads(out))  # w = 0.2 at init


def test_model_init_keeps_the_norm_weights_initial_value():
    model = MEAForCausalLM(make_config("tiny", "mea", mea_head_norm_init=0.2))
    for layer in model.model.layers:
        assert torch.equal(layer.self_attn.head_norm.weight, torch.full((model.config.head_dim,), 0.2))
        assert torch.equal(layer.input_layernorm.weight, torch.ones(model.config.hidden_size))  # other norms: 1


@pytest.mark.parametrize("fields", [dict(mea_head_gain=True), dict(mea_head_norm_weight=False),
                                    dict(mea_head_norm_blend=True), dict(mea_head_norm_init=0.2)])
def test_save_and_load_round_trip(tmp_path, fields):
    torch.manual_seed(0)
    model = MEAForCausalLM(make_config("tiny", "mea", **fields)).eval()
    attn = model.model.layers[0].self_attn
    assert (attn.head_gain is not None) == fields.get("mea_head_gain", False)
    assert (attn.head_norm.weight is None) == (not fields.get("mea_head_norm_weight", True))
    with torch.no_grad():
        for p in (attn.head_gain, attn.head_norm_blend):
            if p is not None:
                p.uniform_(0.3, 1.2)
    ids = torch.randint(0, 500, (2, 9))
    want = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = MEAForCausalLM.from_pretrained(tmp_path).eval()
    assert {k: getattr(loaded.config, k) for k in fields} == fields
    torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=0, atol=0)


def test_variations_need_groupnorm():
    with pytest.raises(ValueError, match="need mea_head_norm=True"):
        MEAConfig(**make_config("tiny", "baseline").to_dict() | {"mea_head_gain": True})
    with pytest.raises(ValueError, match="need mea_head_norm=True"):
        make_config("tiny", "mea-no-groupnorm", mea_head_norm_weight=False)
    with pytest.raises(ValueError, match="need head_norm=True"):
        MEAAttention(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, head_norm=False, head_norm_blend=True)
    with pytest.raises(ValueError, match="need mea_head_norm=True"):
        make_config("tiny", "mea-no-groupnorm", mea_head_norm_init=0.2)
    with pytest.raises(ValueError, match="needs head_norm_weight=True"):
        MEAAttention(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, head_norm_weight=False,
                     head_norm_init=0.2)


def test_recall_study_runs_resumes_and_reports(tmp_path, monkeypatch):
    plan = rs.RecallPlan(arms=["baseline", "mea", "mea+blend"], seeds=[0, 1], high_lr=1e-2,
                         settings=dict(pairs=2, queries=2, num_keys=8, num_values=8, steps=4, batch=8, eval_size=16))
    summary = rs.run_recall_study(tmp_path, plan, log=lambda m: None)
    assert len(summary["rows"]) == 6 and all(len(r["accuracy"]) == 2 for r in summary["rows"])
    blend = next(r for r in summary["rows"] if r["arm"] == "mea+blend")
    assert len(blend["learned"]["head_norm_blend"]) == 2 and blend["vs_mea"]["p"] is not None
    assert summary["verdicts"] and "mea+blend" in (tmp_path / "report.md").read_text()
    calls = []
    monkeypatch.setattr("mea.eval.mqar.train_mqar", lambda *a, **k: calls.append(a))
    again = rs.run_recall_study(tmp_path, plan, log=lambda m: None)  # everything done: nothing retrains
    assert calls == [] and again["rows"] == json.loads((tmp_path / "summary.json").read_text())["rows"]
    plan.seeds = [0]
    with pytest.raises(ValueError, match="another plan"):
        rs.run_recall_study(tmp_path, plan)
    with pytest.raises(ValueError, match="unknown arm"):
        rs.run_recall_study(tmp_path / "x", rs.RecallPlan(arms=["mea+magic"]))


def test_norm_warmup_schedules_the_blend_and_ends_as_mea():
    from mea.eval.mqar import train_mqar

    small = dict(pairs=2, queries=2, num_keys=8, num_values=8, steps=6, batch=8, eval_size=16)
    run = train_mqar("mea", mea_head_norm_blend=True, norm_warmup=3, **small)
    assert all(a == 1.0 for layer in run["learned"]["head_norm_blend"] for a in layer)  # fixed, at full strength
    assert len(run["head_output_rms"]["init"]) == 2 and all(x > 0 for x in run["head_output_rms"]["end"])
    assert train_mqar("baseline", **small)["head_output_rms"] == {"init": None, "end": None}  # no GroupNorm
    learned = train_mqar("mea", mea_head_norm_blend=True, **small)  # without the warm-up the blend is learned
    assert all(abs(a) < 0.5 for layer in learned["learned"]["head_norm_blend"] for a in layer)
    with pytest.raises(ValueError, match="mea_head_norm_blend=True"):
        train_mqar("mea", norm_warmup=3, **small)


def test_verdicts_give_a_partial_recovery_as_a_share_of_the_gap():
    plan = {"arms": ["baseline", "mea", "mea+gain"], "lr": 1e-3, "high_lr": 3e-2, "seeds": [0, 1, 2], "settings": {}}
    accuracy = {"baseline": [0.98, 0.99, 1.0], "mea": [0.30, 0.31, 0.32], "mea+gain": [0.63, 0.65, 0.67]}
    runs = [{"arm": arm, "lr": 1e-3, "seed": s, "accuracy": a, "final_train_loss": 0.1, "num_values": 16}
            for arm, accs in accuracy.items() for s, a in enumerate(accs)]
    mea, verdict = rs.summarize(plan, runs)["verdicts"]
    assert mea.startswith("MEA recalls 0.310 vs the baseline's 0.990 at lr 0.001 (p ")
    assert verdict.startswith("mea+gain: recovers 50% of MEA's gap to the baseline: 0.650")


def test_the_small_init_variant_is_mea_with_the_norm_weight_at_0_1():
    cfg = make_config("tiny", "mea-gn0.1")
    assert cfg.mea_hlc and cfg.mea_head_norm and cfg.mea_head_norm_init == 0.1
    assert {k: v for k, v in cfg.to_dict().items() if k.startswith("mea_") and k != "mea_head_norm_init"} == \
        {k: v for k, v in make_config("tiny", "mea").to_dict().items() if k.startswith("mea_") and k != "mea_head_norm_init"}


def test_measured_init_sets_each_norm_to_the_rms_it_then_reads(tmp_path):
    from mea.models.head_norm_init import MEASURE_ROWS, head_output_rms, measure_head_norm_init

    torch.manual_seed(0)
    model = MEAForCausalLM(make_config("tiny", "mea-gn-measured"))
    weights = [layer.self_attn.head_norm.weight for layer in model.model.layers]
    assert all(torch.equal(w, torch.ones_like(w)) for w in weights)  # 1 until measured
    ids = torch.randint(0, 100, (MEASURE_ROWS + 4, 48))
    measured = measure_head_norm_init(model, ids)
    assert len(measured) == len(weights) and all(0 < m < 1 for m in measured)
    assert [w.unique().tolist() for w in weights] == [[pytest.approx(m)] for m in measured]
    # each layer was measured after the earlier ones were set: reading again gives the same values
    assert head_output_rms(model, ids[:MEASURE_ROWS]) == pytest.approx(measured, rel=1e-5)
    model.save_pretrained(tmp_path / "m")
    loaded = MEAForCausalLM.from_pretrained(tmp_path / "m")
    assert loaded.config.mea_head_norm_init == "measured"
    assert loaded.model.layers[-1].self_attn.head_norm.weight[0].item() == pytest.approx(measured[-1])
    plain = MEAForCausalLM(make_config("tiny", "mea"))
    assert measure_head_norm_init(plain, ids) is None
    assert all(torch.equal(l.self_attn.head_norm.weight, torch.ones(plain.config.head_dim)) for l in plain.model.layers)
    for bad in ("meassured", 0.0, -1.0):
        with pytest.raises(ValueError, match="positive number or 'measured'"):
            make_config("tiny", "mea", mea_head_norm_init=bad)
    with pytest.raises(ValueError, match="mea_head_norm=True"):
        make_config("tiny", "baseline", mea_head_norm_init="measured")


def test_training_starts_a_measured_norm_from_its_first_batch(tmp_path, monkeypatch):
    from mea.data import corpus_dir
    from mea.eval.mqar import train_mqar
    from mea.train import TrainConfig, train

    small = dict(pairs=2, queries=2, num_keys=8, num_values=8, steps=2, batch=8, eval_size=16, lr=1e-6)
    run = train_mqar("mea", mea_head_norm_init="measured", **small)
    assert len(run["head_norm_measured_init"]) == 2 and all(0 < x < 0.5 for x in run["head_norm_measured_init"])
    assert train_mqar("mea", **small)["head_norm_measured_init"] is None
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text((corpus_dir() / "macbeth_gut.txt").read_text(encoding="utf-8")[:40_000])
    monkeypatch.setenv("MEA_CACHE", str(tmp_path / "cache"))
    cfg = TrainConfig(preset="tiny", variant="mea-gn-measured", data=[str(tmp_path / "text")], seq_len=32,
                      batch_size=4, steps=1, warmup_steps=1, lr=1e-6, eval_every=1, eval_windows=2, save_every=1)
    train(cfg, tmp_path / "run", progress=False)
    model = MEAForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert all(l.self_attn.head_norm.weight.max().item() < 0.5 for l in model.model.layers)
    measured = json.loads((tmp_path / "run" / "run.json").read_text())["head_norm_measured_init"]
    assert len(measured) == len(model.model.layers) and all(0 < m < 0.5 for m in measured)
