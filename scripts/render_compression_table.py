"""Print the README's compression table (markdown) from results/compression/*.json."""
import json
from pathlib import Path

R = Path("results/compression")
ROWS = [  # file, method description, layers
    ("full2-svd", "data-free SVD (the paper's)", "all 30, h'=2"),
    ("full2-whitened-plain", "whitened (input moments only)", "all 30, h'=2"),
    ("full2-whitened-keys", "whitened + query-weighted K", "all 30, h'=2"),
    ("full2-whitened-values", "whitened + W_O-weighted V", "all 30, h'=2"),
    ("full2-whitened", "whitened + query-weighted K + W_O-weighted V", "all 30, h'=2"),
    ("full2-whitened-fit20", "  + layer-wise fit (20 steps/layer)", "all 30, h'=2"),
    ("half2-whitened", "whitened + weighting", "middle 16, h'=2"),
    ("budget50-whitened-fit20", "whitened + weighting + layer-wise fit, probe-allocated", "budget 0.5"),
]
RECOVERED = [  # file, starting point, layers, KV fraction
    ("full2-teacher60-rec", "whitened + weighting + teacher-forced fit (60 steps), then distillation 150k tokens",
     "all 30, h'=2", 2 / 3),
    ("budget50-rec", "probe-allocated row above, then distillation 150k tokens", "budget 0.5", 0.5),
]
original = json.loads((R / "original.json").read_text())["ppl"]
print("| method | layers | KV bytes/token (fp32) | KV vs original | held-out ppl | vs original |")
print("|---|---|---|---|---|---|")
print(f"| original SmolLM2-135M-Instruct | - | 46080 | 1.00 | {original:.1f} | - |")
for name, method, layers in ROWS:
    path = R / f"{name}.json"
    if not path.exists():
        continue
    d = json.loads(path.read_text())
    kv = d["kv_bytes_per_token_fp32"]["compressed"]["kv_bytes_per_token"]
    ppl = d["perplexity"]["compressed"]
    print(f"| {method} | {layers} | {kv:.0f} | {d['kv_fraction']:.2f} | {ppl:.1f} | {ppl / original - 1:+.0%} |")
for name, method, layers, fraction in RECOVERED:
    path = R / f"{name}.json"
    if not path.exists():
        continue
    d = json.loads(path.read_text())
    ppl = d["ppl_after"]
    print(f"| {method} (ppl before {d['ppl_before']:.1f}) | {layers} | {46080 * fraction:.0f} | {fraction:.2f} | "
          f"{ppl:.1f} | {ppl / original - 1:+.0%} |")
