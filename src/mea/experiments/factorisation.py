"""Factorisation families side by side, training-free: for each compression method and KV fraction kept,
the relative error of every layer's key and value outputs on held-out text and the held-out perplexity.

    python scripts/factorisation_table.py [--out results/factorisation] [--src smollm2]

Each (method, kept) result is its own JSON file, written atomically and skipped when it exists, so an
interrupted run resumes. Calibration and evaluation use `mea compress`'s defaults (`CompressOptions`).
The key/value error of a layer is  sum_t |K_t - K^_t|^2 / sum_t |K_t|^2  over the held-out tokens (all
composite heads, before RoPE, which preserves norms), computed exactly from the held-out input moments.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

from ..atomic import write_json_atomic, write_text_atomic
from ..compress.calibrate import input_moments
from ..compress.factor_model import composite_heads
from ..compress.factorize import relative_error
from ..compress.methods import method_of
from ..compress.pipeline import CompressOptions, compress_model, heldout_windows
from ..convert import load_source, to_mea
from ..eval import perplexity

METHODS = ("svd", "whitened", "rope-pair", "rope-pair-latent")
KEPT = (2 / 3, 0.5)


def target_options(method: str, kept: float, num_kv_heads: int) -> dict:
    """How each family reaches a KV fraction: whole heads everywhere when kept * h is whole (head-level
    methods), else every layer keeps that share, split between keys and values by their errors."""
    heads = kept * num_kv_heads
    if method_of(method).value_mixing == "head" and abs(heads - round(heads)) < 1e-6:
        return {"virtual_heads": round(heads)}
    return {"kv_budget": kept, "allocate": "errors"}


def layer_errors(teacher, student, moments: list[torch.Tensor]) -> dict[str, list[float]]:
    keys, values = [], []
    for t_block, s_block, sigma in zip(teacher.model.layers, student.model.layers, moments):
        (tk, tv), (sk, sv) = composite_heads(t_block.self_attn), composite_heads(s_block.self_attn)
        keys.append(relative_error(tk, sk, sigma))
        values.append(relative_error(tv, sv, sigma))
    return {"key": keys, "value": values}


def run_factorisation_study(out: str | Path, *, src: str = "smollm2", methods=METHODS, kept=KEPT, log=print) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source = load_source(src)
    teacher = to_mea(source.model).eval()
    tok = source.tokenizer
    defaults = CompressOptions()
    held = heldout_windows(tok, defaults)
    machine = {"platform": platform.platform(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "threads": torch.get_num_threads(), "torch": torch.__version__}
    original_file = out / "original.json"
    if not original_file.exists():
        write_json_atomic(original_file, {"source": source.description, "ppl": perplexity(teacher, held)["ppl"],
                                          "heldout_tokens": held[:, 1:].numel(), "machine": machine})
    original_ppl = json.loads(original_file.read_text())["ppl"]
    moments = None
    h = teacher.config.num_key_value_heads
    for fraction in kept:
        for method in methods:
            path = out / f"{method}-kv{round(100 * fraction)}.json"
            if path.exists():
                continue
            if moments is None:
                moments = input_moments(teacher, held)
            t0 = time.perf_counter()
            opts = CompressOptions(method=method, recover="none", evaluate=False,
                                   **target_options(method, fraction, h))
            log(f"{method} at KV kept {fraction:.2f} ...")
            made = compress_model(teacher, tok, opts)
            student, plan, factor_report = made.student, made.plan, made.factor_report
            errors = layer_errors(teacher, student, moments)
            ppl = perplexity(student, held)["ppl"]
            write_json_atomic(path, {
                "method": method, "kept_target": fraction,
                "kv_fraction": student.config.kv_cache_bytes_per_token() / teacher.config.kv_cache_bytes_per_token(),
                "options": vars(opts), "plan": plan, "heldout_layer_error": errors,
                "mean_key_error": sum(errors["key"]) / len(errors["key"]),
                "mean_value_error": sum(errors["value"]) / len(errors["value"]),
                "factor_report": factor_report, "ppl": ppl, "ppl_ratio": ppl / original_ppl,
                "original_ppl": original_ppl, "seconds": round(time.perf_counter() - t0, 1), "machine": machine,
                "command": " ".join(sys.argv)})
    return summarize(out)


def summarize(out: Path) -> dict:
    """table.md and summary.json from the per-run files."""
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*-kv*.json"))]
    rows.sort(key=lambda r: (-r["kept_target"], list(METHODS).index(r["method"]) if r["method"] in METHODS else 99))
    original = json.loads((out / "original.json").read_text())
    table = ["| method | KV kept | key error (mean, min-max over layers) | value error (mean, min-max) | "
             "perplexity | × original |", "|---|---|---|---|---|---|"]
    for r in rows:
        k, v = r["heldout_layer_error"]["key"], r["heldout_layer_error"]["value"]
        table.append(f"| {r['method']} | {r['kv_fraction']:.3f} | {r['mean_key_error']:.3f} ({min(k):.3f}-{max(k):.3f}) "
                     f"| {r['mean_value_error']:.3f} ({min(v):.3f}-{max(v):.3f}) | {r['ppl']:.2f} | "
                     f"{r['ppl_ratio']:.3f} |")
    text = (f"Training-free, {original['source']}; held-out perplexity of the original {original['ppl']:.2f} on "
            f"{original['heldout_tokens']} tokens. Errors: relative error of each layer's keys / values on the "
            "held-out text.\n\n" + "\n".join(table) + "\n")
    write_text_atomic(out / "table.md", text)
    summary = {"original": original, "results": [{k: r[k] for k in ("method", "kept_target", "kv_fraction",
                                                                    "mean_key_error", "mean_value_error", "ppl",
                                                                    "ppl_ratio")} for r in rows]}
    write_json_atomic(out / "summary.json", summary)
    return summary
