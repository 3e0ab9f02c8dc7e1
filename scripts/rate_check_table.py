"""Is a GroupNorm variant's gap at the largest size the size or the rate? The scaling study trains every size
at the rates chosen at mini (0.01 for GroupNorm variants, 0.003 for the baseline); this puts runs of the same
variants at the baseline's rate beside them, at midi, the same data and constant-rate schedule:

    mea study scaling out/midi-lr3e-3 --sizes midi --tokens 2000000 --rounds --variants mea-gn-measured mea \
        --lrs mea=0.003 mea-gn-measured=0.003 --seeds 0
    .venv/bin/python scripts/rate_check_table.py out/scaling out/midi-lr3e-3   # -> results/rate-check/

A shorter budget spaces the validation points differently, so each run's loss is read at the baseline's points
by interpolating linearly in log tokens between its two nearest points (they are 7% apart in tokens).
"""

import sys
from pathlib import Path

import numpy as np

from mea.atomic import write_json_atomic, write_text_atomic
from mea.experiments.run_files import read_json, read_jsonl

OUT = Path("results/rate-check")


def curve(run: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """(tokens, validation loss) of a run, and its peak learning rate."""
    fix = f"rerun the run {run} (or remove it)"
    records, _ = read_jsonl(run / "metrics.jsonl", fix=fix)  # a line cut short by a running writer is skipped
    rows = [r for r in records if "val_loss" in r]
    lr = read_json(run / "run.json", fix=fix)["config"]["lr"]
    return np.array([r["tokens"] for r in rows], float), np.array([r["val_loss"] for r in rows]), lr


def loss_at(tokens: np.ndarray, loss: np.ndarray, at: float) -> float | None:
    if not tokens[0] <= at <= tokens[-1]:
        return None
    return float(np.interp(np.log(at), np.log(tokens), loss))


def main(study: str, check: str) -> None:
    rows = []
    for run in sorted(Path(check, "runs").glob("*__*__s*")):
        size, variant, seed = run.name.split("__")
        base_t, base_l, base_lr = curve(Path(study, "runs", f"{size}__baseline__{seed}"))
        main_t, main_l, main_lr = curve(Path(study, "runs", run.name))
        t, l, lr = curve(run)
        for at, base in zip(base_t, base_l):
            here, there = loss_at(t, l, at), loss_at(main_t, main_l, at)
            if at >= 400_000 and here is not None and there is not None:
                rows.append({"size": size, "variant": variant, "seed": seed, "tokens": int(at), "baseline": base,
                             "baseline_lr": base_lr, "study_lr": main_lr, "study": there, "check_lr": lr,
                             "check": here, "gap_study": there - base, "gap_check": here - base})
    lines = ["# GroupNorm variants at midi: the scaling study's rate against the baseline's", "",
             f"Validation loss (nats) at the baseline's evaluation points, one seed; `{study}` runs against "
             f"`{check}` runs (commands in `scripts/rate_check_table.py`). Gap: variant - baseline.", "",
             "| size | variant | seed | tokens | baseline (lr) | variant at the study's lr | gap | variant at the "
             "baseline's lr | gap |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['size']} | {r['variant']} | {r['seed']} | {r['tokens'] / 1e6:.2f}M | {r['baseline']:.3f} "
              f"({r['baseline_lr']:g}) | {r['study']:.3f} ({r['study_lr']:g}) | {r['gap_study']:+.3f} | "
              f"{r['check']:.3f} ({r['check_lr']:g}) | {r['gap_check']:+.3f} |" for r in rows]
    OUT.mkdir(parents=True, exist_ok=True)
    write_text_atomic(OUT / "report.md", "\n".join(lines) + "\n")
    write_json_atomic(OUT / "summary.json", {"study": study, "check": check, "rows": rows})
    print(f"wrote {OUT}/report.md ({len(rows)} rows)")


if __name__ == "__main__":
    main(*sys.argv[1:3])
