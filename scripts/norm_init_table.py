"""Language-model loss of MEA with GroupNorm's weight initialised small (`mea_head_norm_init`), against the
scaling study's runs at the same size, data, schedule and token count (its first round).

    for size in micro mini; do for s in 0 1; do mea train --config out/scaling/configs/${size}__mea__s$s.json \
        --set mea_head_norm_init=0.1 --out out/norm-init/${size}__mea-w0.1__s$s --until 489; done; done
    for s in 0 1; do mea train --config out/scaling/configs/micro__mea__s$s.json \
        --set mea_head_norm_init=measured --out out/norm-init/micro__mea-wmeasured__s$s --until 489; done
    mkdir -p results/norm-init && for r in out/norm-init/*/; do mkdir -p results/norm-init/$(basename $r) && \
        cp $r/metrics.jsonl $r/run.json results/norm-init/$(basename $r)/; done
    .venv/bin/python scripts/norm_init_table.py   # -> results/norm-init/report.md

The other variants' losses come from results/scaling/summary.json (`loss_at`, per seed, at `at_tokens`).
A second table puts the learning-rate study's short runs side by side (the same quick preset for both):

    mea study lr out/lr-gn-init --variants mea-gn0.1 --lrs 0.01 0.1 0.3 --seeds 0 1 2
    mkdir -p results/lr-gn-init && cp out/lr-gn-init/{report.md,summary.json,study.json,*.png} results/lr-gn-init/
    mea study lr out/lr-gn-measured --variants mea-gn-measured --lrs 0.01 0.1 0.3 --seeds 0 1 2   # the same for
    mkdir -p results/lr-gn-measured && cp out/lr-gn-measured/{report.md,summary.json,study.json,*.png} \
        results/lr-gn-measured/                                                           # the measured init
"""

import json
import sys
from pathlib import Path

from mea.experiments.stats import p_text, welch

OUT = Path("results/norm-init")


def main() -> None:
    scaling = json.loads(Path("results/scaling/summary.json").read_text())
    params = scaling["params"]
    lines = ["# MEA with GroupNorm's weight initialised small: language-model loss", "",
             "The scaling study's data and schedule, each variant at its learning rate there (MEA's for the new "
             "runs); validation loss at the token count every run reached; p: Welch's t-test over seeds against "
             "the baseline and against MEA. Made by `.venv/bin/python scripts/norm_init_table.py` (commands in its "
             "docstring)."]
    for size in sorted({run.name.split("__")[0] for run in OUT.glob("*__*__s*")}, key=list(params).index):
        cells = {c["variant"]: c for c in scaling["cells"] if c["size"] == size and c.get("loss_at")}
        if "baseline" not in cells or "mea" not in cells:
            lines += ["", f"**{size}**: the scaling study has no shared loss for the baseline and MEA yet."]
            continue
        at = cells["baseline"]["at_tokens"]
        losses = {v: cells[v]["loss_at"] for v in cells if cells[v]["at_tokens"] == at}
        for run in sorted(OUT.glob(f"{size}__*__s*")):
            init = json.loads((run / "run.json").read_text())["config"]["model"]["mea_head_norm_init"]
            points = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                      if "val_loss" in line]
            loss = next((p["val_loss"] for p in points if p["tokens"] == at), None)
            if loss is not None:
                label = "measured (the raw head outputs' RMS)" if init == "measured" else f"{init:g}"
                losses.setdefault(f"mea, GroupNorm weight {label} at init", []).append(loss)
        lines += ["", f"**{size}** ({params[size]:,} parameters), at {at:,} tokens", "",
                  "| variant | loss per seed | mean | gap to the baseline (p) | vs MEA (p) |", "|---|---|---|---|---|"]
        for name, vals in losses.items():
            gaps = [welch(vals, losses[ref]) if name != ref else None for ref in ("baseline", "mea")]
            gap, vs_mea = ("—" if w is None else f"{w['diff']:+.3f} ({p_text(w['p'])})" for w in gaps)
            lines.append(f"| {name} | {', '.join(f'{v:.3f}' for v in vals)} | {sum(vals) / len(vals):.3f} | {gap} | "
                         f"{vs_mea} |")
    lines += lr_study_lines()
    (OUT / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


NEW_LR_STUDIES = {"mea-gn0.1": "results/lr-gn-init", "mea-gn-measured": "results/lr-gn-measured"}


def lr_study_lines() -> list[str]:
    """Final validation loss per variant and rate in the quick learning-rate study and the new variants' runs at
    the same preset, each against the baseline at its best rate."""
    quick = Path("results/lr-study-quick/summary.json")
    new = {v: Path(d) / "summary.json" for v, d in NEW_LR_STUDIES.items() if (Path(d) / "summary.json").exists()}
    if not quick.exists() or not new:
        return []
    tables = [json.loads(quick.read_text())] + [json.loads(p.read_text()) for p in new.values()]
    variants = ["baseline", "mea", *new]
    rows = [r for t in tables for r in t["table"] if r["variant"] in variants]
    best = tables[0]["best_lr"]["baseline"]
    base = next(r["losses"] for r in rows if r["variant"] == "baseline" and r["lr"] == best)
    lrs = sorted({r["lr"] for r in rows if r["variant"] in new})
    lines = ["", "**The learning-rate study's short runs** (`--preset quick`: mini, 150 steps of 16 x 128 tokens, "
             f"3 seeds; results/lr-study-quick/ and {', '.join(d + '/' for v, d in NEW_LR_STUDIES.items() if v in new)}):"
             f" final validation loss; against the baseline at its best rate ({best:g}, {sum(base) / len(base):.3f}).",
             "", "| variant | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for v in variants:
        cells = []
        for lr in lrs:
            r = next((r for r in rows if r["variant"] == v and r["lr"] == lr), None)
            if r is None or not r["losses"]:
                cells.append("—" if r is None else f"diverged {r['diverged']}/{r['n']}")
                continue
            w = welch(r["losses"], base)
            cells.append(f"{r['mean']:.3f}" + ("" if w is None or (v == "baseline" and lr == best)
                                               else f" ({w['diff']:+.3f}, p {p_text(w['p'])})"))
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    main()
