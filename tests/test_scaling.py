"""The scaling study: the L(D) fit and the gap trend recover known parameters; the study runs end to end in
rounds, resumes a killed run exactly, and refuses another plan in the same folder; `mea train --until`."""

import json
import math

import numpy as np
import pytest

from mea.data import corpus_dir
from mea.experiments import scaling_study as ss
from mea.experiments.launcher import run_tasks
from mea.experiments.scaling_fit import fit_loss_law, fit_with_intervals, gap_trend, loss_law
from mea.experiments.scaling_report import trend_sentence, write_report
from mea.train import TrainConfig, train


def _curves(log_dc, alpha, l0, *, seeds=3, noise=0.004, seed=0):
    rng = np.random.default_rng(seed)
    tokens = np.unique(np.round(np.geomspace(5e5, 3e7, 18)))
    return [[(int(t), float(loss_law(t, log_dc, alpha, l0) + rng.normal(0, noise))) for t in tokens]
            for _ in range(seeds)]


@pytest.mark.parametrize("alpha, l0", [(0.35, 3.0), (0.6, 4.2)])
def test_loss_law_fit_recovers_known_parameters_with_intervals(alpha, l0):
    log_dc = math.log(3e5)
    exact = _curves(log_dc, alpha, l0, seeds=1, noise=0.0)[0]
    fit = fit_loss_law(*zip(*exact))
    assert fit["alpha"] == pytest.approx(alpha, rel=1e-3) and fit["L_0"] == pytest.approx(l0, abs=1e-3)
    assert fit["log_D_c"] == pytest.approx(log_dc, abs=1e-2)
    noisy = fit_with_intervals(_curves(log_dc, alpha, l0), reps=200)
    assert noisy["alpha_ci"][0] < alpha < noisy["alpha_ci"][1]
    assert noisy["L_0_ci"][0] < l0 < noisy["L_0_ci"][1]
    assert noisy["alpha_ci"][1] - noisy["alpha_ci"][0] < 0.2 and noisy["seeds"] == 3
    assert fit_loss_law([1e6, 2e6, 3e6], [3.0, 2.9, 2.8]) is None  # too few points for three parameters


def test_gap_trend_and_its_verdict():
    base = _curves(math.log(3e5), 0.4, 3.0)
    # the other variant starts 0.3 nats worse and closes 0.05 nats per tenfold tokens
    other = [[(t, x + 0.3 - 0.05 * (math.log10(t) - math.log10(5e5))) for t, x in c] for c in _curves(
        math.log(3e5), 0.4, 3.0, seed=1)]
    tr = gap_trend(other, base, reps=200)
    assert tr["slope_per_decade"] == pytest.approx(-0.05, abs=0.01)
    assert tr["slope_ci"][1] < 0 and tr["first"]["gap"] > tr["last"]["gap"] > 0
    sentence = trend_sentence({"size": "micro", "variant": "mea", "trend": tr})
    assert "the gap shrinks" in sentence and "would close near" in sentence
    ahead = [[(t, 2 * x - y) for (t, x), (_, y) in zip(a, b)] for a, b in zip(base, other)]
    lead = gap_trend(ahead, base, reps=200)  # the mirror image: 0.3 nats ahead, the lead shrinking
    assert lead["slope_ci"][0] > 0 and lead["last"]["gap"] < 0
    sentence = trend_sentence({"size": "micro", "variant": "mea", "trend": lead})
    assert "its lead shrinks" in sentence and "would vanish near" in sentence and "gap" not in sentence.split(":")[1]
    flat = gap_trend([[(t, x + 0.2) for t, x in c] for c in _curves(math.log(3e5), 0.4, 3.0, seed=2)], base, reps=200)
    assert "holds" in trend_sentence({"size": "micro", "variant": "mea", "trend": flat})
    # closing over the first half decade, then level at +0.1: it shrinks overall, but not over the last tenfold
    stalls = [[(t, x + 0.1 + 0.2 * max(0.0, 1 - 2 * (math.log10(t) - math.log10(5e5)))) for t, x in c]
              for c in _curves(math.log(3e5), 0.4, 3.0, seed=3)]
    stall = gap_trend(stalls, base, reps=200)
    assert stall["slope_ci"][1] < 0 and stall["recent"]["from_tokens"] >= 3e6
    assert stall["recent"]["slope_ci"][0] <= 0 <= stall["recent"]["slope_ci"][1]
    sentence = trend_sentence({"size": "micro", "variant": "mea", "trend": stall})
    assert "the gap shrinks" in sentence and "no longer shrinks" in sentence and "would close" not in sentence
    assert tr["recent"]["slope_per_decade"] == pytest.approx(-0.05, abs=0.015)  # a steady trend: the same rate
    assert "at the last tenfold rate it would close near" in trend_sentence({"size": "micro", "variant": "mea",
                                                                            "trend": tr})
    short = gap_trend([c[:8] for c in other], [c[:8] for c in base], reps=50)  # under a decade: no recent rate
    assert "recent" not in short and "at that rate" in trend_sentence({"size": "micro", "variant": "mea",
                                                                        "trend": short})


def test_plan_rates_rounds_and_shared_validation_points(tmp_path, monkeypatch):
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"best_lr": {"baseline": 0.003, "mea": 0.01, "groupnorm": 0.01,
                                               "mea-no-groupnorm": 0.003}}))
    monkeypatch.setattr(ss, "LR_STUDY_SUMMARY", summary)
    plan = ss.make_plan("cpu", lrs=ss.parse_lrs(["mea=2e-2"]))
    assert plan.lrs == {"baseline": 0.003, "groupnorm": 0.01, "mea-no-groupnorm": 0.003, "mea": 0.02}
    tasks = ss.run_tasks_of(plan)
    first = [t for t in tasks if t.until == ss.steps_for(plan, plan.rounds[0])]
    assert [t.name for t in first[:8]] == [ss.run_name("micro", v, s) for s in (0, 1) for v in plan.lrs]
    assert len(first) == 24 and sum(t.until is None for t in tasks) == 24
    micro, midi = (ss.run_config(plan, size, "mea", 0) for size in ("micro", "midi"))
    assert micro.min_lr_ratio == 1.0 and micro.eval_spread  # constant after warm-up
    assert midi.eval_steps == [s for s in micro.eval_steps if s < midi.steps]  # the same token points
    gaps = np.diff(np.log(micro.eval_steps))
    assert gaps.max() < 2.5 * gaps[len(gaps) // 2]  # log-spaced
    with pytest.raises(ValueError, match="VARIANT=LR"):
        ss.parse_lrs(["mea:1e-2"])
    # one size's own rate: that size's runs only; a study in progress names the runs begun at the old rate
    sized = ss.make_plan("cpu", lrs=ss.parse_lrs(["mea=2e-2", "midi:mea=3e-3"]))
    assert sized.variants == list(plan.lrs) and sized.lrs["midi:mea"] == 0.003
    assert [ss.run_config(sized, size, "mea", 0).lr for size in ("micro", "mini", "midi")] == [0.02, 0.02, 0.003]
    assert ss.run_config(sized, "midi", "groupnorm", 0).lr == 0.01
    begun = tmp_path / "study" / "runs" / ss.run_name("midi", "mea", 1)
    begun.mkdir(parents=True)
    (begun / "run.json").write_text(json.dumps({"config": {"lr": 0.02}}))
    ss.check_rates(tmp_path / "study", ss.run_tasks_of(plan))  # the same rate: continues
    with pytest.raises(ValueError, match=r"midi__mea__s1 \(lr 0.02\).*move them out"):
        ss.check_rates(tmp_path / "study", ss.run_tasks_of(sized))
    for bad, why in ((["huge:mea=1e-3"], "sizes not in the study"), (["midi:transformer=1e-3"], "variants not in")):
        with pytest.raises(ValueError, match=why):
            ss.make_plan("cpu", lrs=ss.parse_lrs(bad))
    with pytest.raises(ValueError, match="SIZE:VARIANT=LR"):
        ss.parse_lrs(["a:b:c=1e-3"])
    summary.unlink()
    with pytest.raises(ValueError, match="--lrs"):
        ss.make_plan("cpu")
    with pytest.raises(ValueError, match="unknown preset"):
        ss.make_plan("cpu", sizes=["huge"], lrs={v: 1e-3 for v in ss.VARIANTS})


def test_a_study_may_gain_variants_and_nothing_else(tmp_path):
    plan = {"sizes": {"micro": 100}, "lrs": {"baseline": 3e-3, "mea": 1e-2}, "seeds": [0, 1]}
    ss.fix_plan(tmp_path, plan, command="c", growing="lrs")
    grown = {**plan, "lrs": {**plan["lrs"], "mea-gn-measured": 1e-2}}
    ss.fix_plan(tmp_path, grown, command="c", growing="lrs")  # a variant added: allowed, and saved
    assert json.loads((tmp_path / "study.json").read_text()) == grown
    for other in ({**grown, "seeds": [0]}, {**grown, "lrs": {**grown["lrs"], "mea": 3e-3}},  # changed, not grown
                  {**grown, "lrs": {"baseline": 3e-3}}):  # shrunk
        with pytest.raises(ValueError, match="another plan .*adding to its lrs is allowed"):
            ss.fix_plan(tmp_path, other, command="c", growing="lrs")
    with pytest.raises(ValueError, match="another plan"):
        ss.fix_plan(tmp_path, plan, command="c")  # without growing, only the same plan


@pytest.fixture
def text(tmp_path, monkeypatch):
    monkeypatch.setenv("MEA_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "text.txt"
    path.write_text((corpus_dir() / "macbeth_gut.txt").read_text(encoding="utf-8")[:80_000])
    return path


def _tiny_plan(text) -> ss.ScalingPlan:
    return ss.ScalingPlan(sizes={"tiny": 6 * 128}, lrs={"baseline": 1e-2, "mea": 1e-2}, seeds=[0], rounds=[2 * 128],
                          train=dict(seq_len=32, batch_size=4, warmup_steps=1, eval_windows=4, log_every=1,
                                     save_every=2),
                          eval_points=6, data=[str(text)])


def _val(run) -> list:
    return [(r["step"], r["val_loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "val_loss" in r]


@pytest.mark.slow  # 4 training processes: minutes on a loaded 2-core machine
def test_tiny_scaling_study_end_to_end_with_a_killed_run(text, tmp_path):
    plan, out = _tiny_plan(text), tmp_path / "study"
    ss.fix_plan(out, ss.asdict(plan), command="mea study scaling")
    first_round = [t for t in ss.run_tasks_of(plan) if t.until == 2]
    assert run_tasks(out, first_round, jobs=2, log=lambda m: None) == []
    killed = out / "runs" / ss.run_name("tiny", "mea", 0)
    assert json.loads((killed / "status.json").read_text())["state"] == "paused"
    # killed at step 3, after the checkpoint at step 2: a metrics line past it and one cut short
    status = json.loads((killed / "status.json").read_text())
    (killed / "status.json").write_text(json.dumps({**status, "state": "running", "step": 3}))
    with open(killed / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "tokens": 384, "val_loss": 9.0}) + '\n{"step": 4, "tok')
    result = ss.run_scaling(out, plan, jobs=2, log=lambda m: None)
    assert result["failed"] == [] and result["runs"] == 2
    reference = tmp_path / "reference"
    train(ss.run_config(plan, "tiny", "mea", 0), reference, progress=False)
    assert _val(killed) == _val(reference)  # the resumed run equals an uninterrupted one
    assert [s for s, _ in _val(killed)] == sorted(set(ss.eval_steps(plan)) | {6})
    summary = json.loads((out / "summary.json").read_text())
    cell = next(c for c in summary["cells"] if c["variant"] == "mea")
    assert cell["tokens"] == 6 * 128 and cell["epochs"] > 0 and len(cell["loss_at"]) == 1
    assert summary["gaps"][0]["points"] and (out / "report.md").read_text().count("| tiny |") == 2
    assert (out / "loss_vs_tokens.png").stat().st_size > 0
    seen = []
    ss.run_scaling(out, plan, jobs=1, log=seen.append)  # all done: nothing reruns
    assert all("0 to run" in m for m in seen if m.startswith("study"))
    plan.seeds = [0, 1]
    with pytest.raises(ValueError, match="another plan"):
        ss.run_scaling(out, plan)
    assert write_report(out)["runs"] == 2
    # a folder published without runs/ re-reports the same from the runs.json the report wrote
    published = tmp_path / "published"
    published.mkdir()
    for name in ("study.json", "runs.json"):
        (published / name).write_text((out / name).read_text())
    write_report(published)
    assert (published / "report.md").read_text() == (out / "report.md").read_text()
    (published / "runs.json").unlink()
    with pytest.raises(ValueError, match="neither runs/ nor runs.json"):
        write_report(published)


def test_train_until_pauses_and_resume_continues_exactly(text, tmp_path):
    cfg = TrainConfig(preset="tiny", variant="mea", data=[str(text)], seq_len=32, batch_size=4, steps=6,
                      warmup_steps=1, log_every=1, eval_every=3, eval_windows=4, save_every=4, min_lr_ratio=1.0)
    whole = train(cfg, tmp_path / "a", progress=False)
    paused = train(cfg, tmp_path / "b", progress=False, until=3)  # between checkpoints: one is written at 3
    assert paused["state"] == "paused" and paused["step"] == 3 and not (tmp_path / "b" / "model").exists()
    again = train(cfg, tmp_path / "b", resume=True, progress=False, until=3)  # already there: nothing to do
    assert again["state"] == "paused" and again["step"] == 3
    done = train(None, tmp_path / "b", resume=True, progress=False)
    assert done["state"] == "finished" and done["final_val_loss"] == whole["final_val_loss"]
    assert _val(tmp_path / "b") == _val(tmp_path / "a")
    with pytest.raises(ValueError, match="--until"):
        train(cfg, tmp_path / "c", until=0)


def test_gap_by_size_waits_for_sizes_not_started():
    from mea.experiments.scaling_report import _gap_by_size

    def gap(size, points):  # two seeds a side, 0.02 either side of their means
        return {"size": size, "variant": "mea", "points": [{"tokens": t, "gap": g, "p": 0.01, "seeds": [4 + g - 0.02,
                4 + g + 0.02], "baseline_seeds": [3.98, 4.02]} for t, g in points]}

    params = {"micro": 10**5, "mini": 10**6, "midi": 10**7}
    got = _gap_by_size("mea", [gap("micro", [(1000, 0.5), (2000, 0.4)]), gap("mini", [(1000, 0.45), (2000, 0.3)]),
                               gap("midi", [])], params)
    assert got["tokens"] == 2000 and [r["size"] for r in got["rows"]] == ["micro", "mini"]
    assert abs(got["slope_per_decade"] - (-0.1)) < 1e-9
    lo, hi = got["slope_ci"]  # resampling moves each size's gap by at most 0.04: the slope by at most 0.08
    assert -0.18 - 1e-9 <= lo < -0.1 < hi <= -0.02 + 1e-9
