"""Refresh the generated parts of README.md (between `<!-- NAME:begin -->` / `<!-- NAME:end -->` markers)
from results/: the compression table, the learning-rate study's report, the needle table, the compression
sensitivity map and the benchmark tables."""
import json
import re
import subprocess
import sys
from pathlib import Path

readme = Path("README.md")


def fill(text: str, name: str, body: str) -> str:
    block = f"<!-- {name}:begin -->\n{body.strip()}\n<!-- {name}:end -->"
    return re.sub(rf"<!-- {name}:begin -->.*?<!-- {name}:end -->", lambda _: block, text, flags=re.S)


text = readme.read_text()
table = subprocess.run([sys.executable, "scripts/render_compression_table.py"], capture_output=True, text=True,
                       check=True).stdout
text = fill(text, "compression-table", table)
study = Path("results/lr-study-quick")
if (study / "report.md").is_file():
    text = fill(text, "lr-study", (study / "report.md").read_text()
                + f"\n![learning-rate sweep]({study}/lr_sweep.png)\n\n![training curves]({study}/curves.png)\n")
needles = sorted(Path("results/needle").glob("*.json"), key=lambda p: (p.stem != "smollm2", p.stem))  # original first
if needles:
    runs = [json.loads(p.read_text()) for p in needles]
    cells = [(c["length"], c["depth"]) for c in runs[0]["cells"]]
    rows = ["| model | " + " | ".join(f"{n} @ {d:.0%}" for n, d in cells) + " |", "|---|" + "---|" * len(cells)]
    for r in runs:
        acc = {(c["length"], c["depth"]): c for c in r["cells"]}
        rows.append(f"| {r['model']} | " + " | ".join(
            f"{acc[k]['accuracy']:.1f} ({acc[k]['answer_logprob']:.1f})" if k in acc else "—" for k in cells) + " |")
    text = fill(text, "needle-table", "\n".join(rows) + "\n")
bench = Path("results/bench")
for name in ("train", "prefill", "decode", "decode_bf16", "memory"):
    if (bench / f"{name}.md").is_file():
        text = fill(text, f"bench-{name}", (bench / f"{name}.md").read_text())
sensitivity = Path("results/sensitivity")
if (sensitivity / "report.md").is_file():
    text = fill(text, "sensitivity", (sensitivity / "report.md").read_text())
readme.write_text(text)
