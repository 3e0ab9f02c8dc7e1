"""The learning-rate study: statistics, the claim verdicts on constructed results, and a tiny end-to-end
study that resumes by skipping finished runs."""

import json

import pytest

from mea.experiments.lr_report import write_report
from mea.experiments.lr_study import make_plan, run_name, run_study
from mea.experiments.stats import fisher_exact, t_sf_two_sided, two_proportions, welch


def test_statistics_against_tables():
    assert t_sf_two_sided(2.776445, 4) == pytest.approx(0.05, abs=1e-6)  # t table, df 4, two-sided 5%
    assert t_sf_two_sided(63.65674, 1) == pytest.approx(0.01, abs=1e-5)
    assert welch([1.0, 2.0], [1.0]) is None
    assert welch([1.0, 2.0, 3.0], [4.0, 5.0, 6.5])["p"] == pytest.approx(0.02915, abs=1e-4)
    assert fisher_exact(0, 3, 3, 3) == pytest.approx(0.1)
    assert fisher_exact(0, 10, 10, 10) == pytest.approx(2 / 184756)
    assert two_proportions(0.6, 100, 0.5, 100) == pytest.approx(0.1556, abs=1e-3)  # z = 1.42


def _fake_study(out, results):
    """results: {(variant, lr): [final val loss or None (diverged), per seed]}."""
    variants = sorted({v for v, _ in results})
    lrs = sorted({lr for _, lr in results})
    seeds = list(range(len(next(iter(results.values())))))
    (out / "runs").mkdir(parents=True)
    (out / "study.json").write_text(json.dumps({"preset": "tiny", "lrs": lrs, "seeds": seeds, "train": {},
                                                "variants": variants, "data": []}))
    for (v, lr), losses in results.items():
        for s, loss in enumerate(losses):
            run = out / "runs" / run_name(v, lr, s)
            run.mkdir()
            state = "finished" if loss is not None else "diverged"
            (run / "status.json").write_text(json.dumps({"state": state}))
            curve = [loss + 1.0, loss] if loss is not None else [5.0]
            lines = [{"step": i + 1, "tokens": (i + 1) * 100, "loss_ema": x, "val_loss": x} for i, x in enumerate(curve)]
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_verdicts_follow_the_numbers(tmp_path):
    _fake_study(tmp_path, {
        ("baseline", 0.01): [3.00, 3.01, 3.02], ("baseline", 0.1): [None, None, None],
        ("mea", 0.01): [2.90, 2.91, 2.92], ("mea", 0.1): [2.95, 2.96, 2.97],
        ("mea-no-groupnorm", 0.01): [3.00, 3.02, 3.01], ("mea-no-groupnorm", 0.1): [None, None, 3.5],
    })
    summary = write_report(tmp_path)
    verdicts = {c["claim"].split(" (")[0]: c["verdict"] for c in summary["claims"]}
    assert summary["reference_lr"] == 0.01 and summary["max_stable_lr"] == {"baseline": 0.01, "mea": 0.1,
                                                                          "mea-no-groupnorm": 0.01}
    assert verdicts["MEA trains stably at larger learning rates than the baseline"] == "not significant"  # 0/3 vs 3/3: p=0.1
    assert verdicts["MEA reaches a lower validation loss than the baseline at the same learning rate"] == "supported"
    assert verdicts["MEA without GroupNorm is about equal to the baseline"].startswith("supported")
    assert (tmp_path / "report.md").read_text().count("| mea |") == 1
    assert (tmp_path / "lr_sweep.png").stat().st_size > 0 and (tmp_path / "curves.png").stat().st_size > 0


def test_a_worse_mea_is_reported_as_contradicted(tmp_path):
    _fake_study(tmp_path, {("baseline", 0.01): [3.00, 3.01, 3.02], ("mea", 0.01): [3.10, 3.11, 3.12]})
    claims = {c["claim"].split(" (")[0]: c["verdict"] for c in write_report(tmp_path)["claims"]}
    assert claims["MEA reaches a lower validation loss than the baseline at the same learning rate"] == "contradicted"


def test_tiny_study_end_to_end_and_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("MEA_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "text.txt"
    from mea.data import corpus_dir

    text.write_text((corpus_dir() / "macbeth_gut.txt").read_text(encoding="utf-8")[:80_000])
    plan = make_plan("quick", variants=["baseline", "mea"], lrs=[1e-2], seeds=[0, 1], steps=3, data=[str(text)])
    plan.preset = "tiny"
    plan.train.update(seq_len=32, batch_size=4, eval_every=3, eval_windows=4)
    result = run_study(tmp_path / "study", plan, jobs=2, log=lambda m: None)
    assert result["failed"] == [] and result["runs"] == 4
    table = json.loads((tmp_path / "study" / "summary.json").read_text())["table"]
    assert all(len(row["losses"]) == 2 for row in table)
    seen = []
    run_study(tmp_path / "study", plan, jobs=1, log=seen.append)  # everything done: nothing reruns
    assert "4 already done, 0 to run" in seen[0]
    plan.lrs = [1e-3]
    with pytest.raises(ValueError, match="another plan"):
        run_study(tmp_path / "study", plan, jobs=1)
    with pytest.raises(ValueError, match="unknown variant"):
        make_plan("quick", variants=["transformer"])


def test_corrupt_run_files_are_errors_naming_the_file(tmp_path):
    results = {("baseline", 0.01): [3.00, 3.01], ("mea", 0.01): [2.90, 2.91]}
    _fake_study(tmp_path, results)
    run = tmp_path / "runs" / run_name("mea", 0.01, 1)
    metrics = run / "metrics.jsonl"
    good = metrics.read_text()
    (run / "status.json").write_text('{"state": "fini')
    with pytest.raises(ValueError, match=r"status\.json is corrupt.*delete .* and rerun"):
        write_report(tmp_path)
    (run / "status.json").write_text(json.dumps({"state": "running"}))
    metrics.write_text(good + '{"step": 3, "tok')  # an append cut short while running: dropped
    write_report(tmp_path)
    (run / "status.json").write_text(json.dumps({"state": "finished"}))
    with pytest.raises(ValueError, match=r"metrics\.jsonl ends in a cut line but the run is finished"):
        write_report(tmp_path)
    metrics.write_text('{"step": 1, "to\n' + good)
    with pytest.raises(ValueError, match=r"metrics\.jsonl is corrupt at line 1"):
        write_report(tmp_path)
    metrics.unlink()  # missing is not corrupt: the run has no losses yet
    (run / "status.json").unlink()
    table = {(c["variant"], c["lr"]): c for c in write_report(tmp_path)["table"]}
    assert table[("mea", 0.01)]["losses"] == [2.90]


def test_run_names_keep_rates_apart_and_old_names_unchanged():
    from mea.experiments.lr_layout import lr_tag

    assert [lr_tag(x) for x in (1e-3, 3e-4, 0.01, 0.3)] == ["1e-03", "3e-04", "1e-02", "3e-01"]  # as before
    assert lr_tag(0.15) == "1.5e-01" and lr_tag(0.1) == "1e-01"  # once both were 1e-01
    assert run_name("mea", 0.15, 0) != run_name("mea", 0.1, 0)
    assert float(lr_tag(1 / 3)) == 1 / 3
