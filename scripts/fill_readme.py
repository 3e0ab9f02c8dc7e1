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


def targets(bench: Path) -> str:
    """Issue 6's targets against the measured results (every number from results/bench/*.json)."""
    load = {n: json.loads((bench / f"{n}.json").read_text()) for n in ("train", "decode", "decode_bf16", "memory")}
    train = load["train"]["ratios"]
    rows = ["| target | measured | met? |", "|---|---|---|",
            f"| training step: MEA ≥ 0.95× our baseline | {train['mea/baseline']:.2f}× | "
            f"{'yes' if train['mea/baseline'] >= 0.95 else 'no'} |",
            f"| training step: our baseline ≥ 1.0× transformers' Llama | {train['baseline/transformers-llama']:.2f}× | "
            f"{'yes' if train['baseline/transformers-llama'] >= 1.0 else 'no'} |"]
    fold = [v for k, v in load["decode"]["speedups"].items() if k.startswith("mea folded vs")]
    rows.append(f"| decoding: folded MEA ≥ 1.0× transformers' Llama at every context (fp32, batch 1 and 8) | "
                f"{min(fold):.2f}×-{max(fold):.2f}× | {'yes' if min(fold) >= 1 else 'no, not at every point'} |")
    for name in ("decode", "decode_bf16"):
        d = load[name]
        for system in ("mea KV -50%", "mea KV -67%"):
            pts = [(k, v) for k, v in d["speedups"].items() if k.startswith(f"{system} vs mea folded")
                   and int(k.split("@ ")[1].split(" x")[0]) >= 16384]
            if not pts:
                continue
            bound = [r["of_bound"] for r in d["results"] if r["system"] == system and r["context"] >= 16384]
            lo, hi = min(v for _, v in pts), max(v for _, v in pts)
            rows.append(f"| decoding ≥ 16k, {system} ({d['settings']['dtype']}): ≥ 1.5× faster than uncompressed "
                        f"(folded) | {lo:.2f}×-{hi:.2f}× over {len(pts)} points | "
                        f"{'yes' if lo >= 1.5 else 'at some points' if hi >= 1.5 else 'no'} |")
            rows.append(f"| ... and within 1.25× of the bandwidth bound | {min(bound):.1f}×-{max(bound):.1f}× "
                        "the bound "
                        f"| {'yes' if max(bound) <= 1.25 else 'no'} |")
    err = [abs(r["kv_error"]) for n in ("decode", "decode_bf16", "memory") for r in load[n]["results"]]
    rows.append(f"| KV bytes held = prediction within 2% | largest deviation {max(err):.2%} over {len(err)} points | "
                f"{'yes' if max(err) <= 0.02 else 'no'} |")
    return "\n".join(rows) + "\n"


if all((bench / f"{n}.json").is_file() for n in ("train", "decode", "decode_bf16", "memory")):
    text = fill(text, "bench-targets", targets(bench))
kernels = bench / "decode_kernels.md"
if kernels.is_file():
    text = fill(text, "decode-kernels", kernels.read_text())
sensitivity = Path("results/sensitivity")
if (sensitivity / "report.md").is_file():
    text = fill(text, "sensitivity", (sensitivity / "report.md").read_text())
readme.write_text(text)
