"""Print the compression table (markdown) from results/compression/*.json: every number is read from a
result file. A recovered row keeps the component heads of the compressed row it started from
(scripts/compression_table.sh pairs them), so its KV bytes are that row's measured bytes."""
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
RECOVERED = [  # file, compressed row it started from, description, layers
    ("full2-teacher60-rec", "full2-teacher60",
     "whitened + weighting + teacher-forced fit (60 steps), then distillation 150k tokens", "all 30, h'=2"),
    ("budget50-rec", "budget50-whitened-fit20", "probe-allocated row above, then distillation 150k tokens",
     "budget 0.5"),
]


def load(name: str) -> dict:
    path = R / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"{path}: not valid JSON ({e}); rerun the command that writes it "
                         "(scripts/compression_table.sh)") from e


def kv_bytes(d: dict, which: str) -> float:
    generated = d["generated"] if "generated" in d else d["kv_bytes_per_token_fp32"]  # the fp32-only name of older files
    return generated[which]["kv_bytes_per_token"]


compressed = {name: load(name) for name, *_ in ROWS + [(start, None) for _, start, *_ in RECOVERED]
              if (R / f"{name}.json").exists()}
original_bytes = {kv_bytes(d, "original") for d in compressed.values()}
if len(original_bytes) != 1:
    raise SystemExit(f"the compressed rows measured different original KV bytes/token: {sorted(original_bytes)}")
original_kv = original_bytes.pop()
original = load("original")["ppl"]
print("| method | layers | KV bytes/token (fp32) | KV vs original | held-out ppl | vs original |")
print("|---|---|---|---|---|---|")
print(f"| original SmolLM2-135M-Instruct | - | {original_kv:.0f} | 1.00 | {original:.1f} | - |")
for name, method, layers in ROWS:
    if name not in compressed:
        continue
    d = compressed[name]
    kv, ppl = kv_bytes(d, "compressed"), d["perplexity"]["compressed"]
    print(f"| {method} | {layers} | {kv:.0f} | {kv / original_kv:.2f} | {ppl:.1f} | {ppl / original - 1:+.0%} |")
for name, start, method, layers in RECOVERED:
    if not (R / f"{name}.json").exists():
        continue
    if start not in compressed:
        raise SystemExit(f"{R / name}.json has no starting row {R / start}.json to read its KV bytes from")
    d, kv = load(name), kv_bytes(compressed[start], "compressed")
    ppl = d["ppl_after"]
    print(f"| {method} (ppl before {d['ppl_before']:.1f}) | {layers} | {kv:.0f} | {kv / original_kv:.2f} | "
          f"{ppl:.1f} | {ppl / original - 1:+.0%} |")
