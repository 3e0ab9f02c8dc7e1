"""Language-model loss of MEA with GroupNorm's weight initialised small (`mea_head_norm_init`), against the
scaling study's baseline, GroupNorm and MEA runs at the same size, data, schedule and token count.

    for s in 0 1; do mea train --config out/scaling/configs/micro__mea__s$s.json --set mea_head_norm_init=0.1 \
        --out out/norm-init/micro__mea-w0.1__s$s --until 489; done
    mkdir -p results/norm-init && for r in out/norm-init/*/; do mkdir -p results/norm-init/$(basename $r) && \
        cp $r/metrics.jsonl $r/run.json results/norm-init/$(basename $r)/; done
    .venv/bin/python scripts/norm_init_table.py   # -> results/norm-init/report.md

The other variants' losses come from results/scaling/summary.json (`loss_at`, per seed, at `at_tokens`)."""

import json
import sys
from pathlib import Path

from mea.experiments.stats import p_text, welch

OUT = Path("results/norm-init")


def main() -> None:
    scaling = json.loads(Path("results/scaling/summary.json").read_text())
    cells = {c["variant"]: c for c in scaling["cells"] if c["size"] == "micro"}
    at = cells["baseline"]["at_tokens"]
    losses = {v: cells[v]["loss_at"] for v in ("baseline", "groupnorm", "mea-no-groupnorm", "mea")}
    runs = sorted(OUT.glob("micro__*__s*"))
    for run in runs:
        init = json.loads((run / "run.json").read_text())["config"]["model"]["mea_head_norm_init"]
        points = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
        loss = next((p["val_loss"] for p in points if p["tokens"] == at), None)
        if loss is not None:
            losses.setdefault(f"mea, GroupNorm weight {init:g} at init", []).append(loss)
    base = losses["baseline"]
    lines = ["# MEA with GroupNorm's weight initialised small: language-model loss", "",
             f"micro (447k parameters), the scaling study's data and schedule, each variant at its learning rate "
             f"there (MEA's 0.01 for the new runs); validation loss at {at:,} tokens; p: Welch's t-test over seeds "
             "against the baseline and against MEA. Made by `.venv/bin/python scripts/norm_init_table.py` (commands in its docstring).", "",
             "| variant | loss per seed | mean | gap to the baseline (p) | vs MEA (p) |", "|---|---|---|---|---|"]
    for name, vals in losses.items():
        mean = sum(vals) / len(vals)
        gaps = [welch(vals, ref) if name != ref_name else None for ref_name, ref in (("baseline", base),
                                                                                      ("mea", losses["mea"]))]
        gap, vs_mea = ("—" if w is None else f"{w['diff']:+.3f} ({p_text(w['p'])})" for w in gaps)
        lines.append(f"| {name} | {', '.join(f'{v:.3f}' for v in vals)} | {mean:.3f} | {gap} | {vs_mea} |")
    (OUT / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
