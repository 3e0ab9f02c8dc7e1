"""Collects the results of scripts/recovery_study.sh into RESULTS/summary.json and RESULTS/summary.md.

    python scripts/recovery_summary.py results/recovery
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SYSTEMS = ("original", "kv67", "rec-short-plain", "rec-long-retrieval")


def load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def row(results: Path, system: str) -> dict:
    modern, hamlet = (load(results / f"{system}-ppl-{d}.json") for d in ("modern", "hamlet"))
    needle = load(results / f"{system}-needle" / "needle.json")
    recovery = load(results / f"{system}.json")
    out = {"system": system,
           "ppl_modern": modern and modern["ppl"], "ppl_hamlet": hamlet and hamlet["ppl"],
           "needle": needle and {str(n): sum(c["accuracy"] for c in needle["cells"] if c["length"] == n) /
                                 sum(1 for c in needle["cells"] if c["length"] == n) for n in needle["lengths"]},
           "needle_logprob": needle and sum(c["answer_logprob"] for c in needle["cells"]) / len(needle["cells"])}
    if recovery:
        d = recovery["distill"]
        out["recovery"] = {k: d.get(k) for k in ("tokens", "steps", "seconds_per_step", "precision", "cpu_capability",
                                                 "cpu_native_bf16", "first_loss", "last_loss")}
        out["recovery"]["seconds"] = recovery["seconds"]
    return out


def main(results: str) -> None:
    from mea.atomic import write_json_atomic, write_text_atomic

    root = Path(results)
    rows = [row(root, s) for s in SYSTEMS]
    base = rows[0]
    lines = ["| system | ppl modern (x orig.) | ppl Hamlet (x orig.) | needle 512 / 1024 / 2048 | answer log-prob |"
             " recovery tokens, s/step, precision |", "|---|---|---|---|---|---|"]
    for r in rows:
        def ratio(key):
            return f"{r[key]:.2f} ({r[key] / base[key]:.3f})" if r[key] and base[key] else "-"
        needle = " / ".join(f"{v:.2f}" for v in r["needle"].values()) if r["needle"] else "-"
        rec = r.get("recovery")
        rec_text = f"{rec['tokens']}, {rec['seconds_per_step']}, {rec['precision']}" if rec else "-"
        logp = f"{r['needle_logprob']:.2f}" if r["needle_logprob"] is not None else "-"
        lines.append(f"| {r['system']} | {ratio('ppl_modern')} | {ratio('ppl_hamlet')} | {needle} | {logp} | "
                     f"{rec_text} |")
    write_json_atomic(root / "summary.json", {"rows": rows})
    write_text_atomic(root / "summary.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1])
