"""report.md, summary.json and frontier.png of a frontier study, from OUT/systems/NAME.MEASURE.json."""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic import write_json_atomic, write_text_atomic
from ..plotting import pyplot, save_figure

PROPORTIONS = ("lambada", "needle", "multikey")  # measures reported with a 95% Wilson interval
# The quality targets of an MEA system at a KV level: (perplexity ratio at most, LAMBADA ratio at least, share of
# the original's needle cells still found at least); a cell is found when most of its trials retrieve the needle.
TARGETS = {0.67: (1.05, 0.9, 1.0), 0.5: (1.15, 0.8, 0.9)}
BY_BYTES, LEVEL_DIGITS = "bytes", 2  # a system's level given as the KV fraction its float cache holds, so rounded
PLOTTED = (("ppl_modern", "perplexity, modern held-out"), ("ppl_shakespeare", "perplexity, Hamlet"),
           ("lambada", "LAMBADA accuracy"), ("needle", "needle retrieval"), ("multikey", "multi-key retrieval"))


def load_rows(out: Path, systems: list[dict]) -> list[dict]:
    """One row per system with any result: its measures' results and the KV bytes per token it holds."""
    rows = []
    for s in systems:
        results = {}
        for f in sorted((out / "systems").glob(f"{s['name']}.*.json")):
            data = json.loads(f.read_text())
            if data.get("name") == s["name"]:
                results[data["measure"]] = data
        if results:
            rows.append({**s, "measures": {m: d["result"] for m, d in results.items()},
                         "seconds": {m: d["seconds"] for m, d in results.items()},
                         "cpu_capability": next(iter(results.values())).get("cpu_capability"),
                         "precision": results.get("bytes", {}).get("placement", {}).get("precision")})
    original = next((r for r in rows if r["name"] == "original"), None)
    base = original and original["measures"].get("bytes", {}).get("kv_bytes_per_token")
    for r in rows:
        per_token = r["measures"].get("bytes", {}).get("kv_bytes_per_token")
        r["kv_bytes_per_token"] = per_token
        r["kv_fraction"] = per_token / base if per_token is not None and base else None
        if r.get("level") == BY_BYTES:
            r["level"] = None if r["kv_fraction"] is None else round(r["kv_fraction"], LEVEL_DIGITS)
        if original is not None and r is not original:
            r["targets"] = target_checks(r, original)
    return rows


def _value(row: dict, measure: str) -> str:
    m = row["measures"].get(measure)
    if m is None:
        return "—"
    if measure.startswith("ppl_"):
        return f"{m['ppl']:.2f}"
    lo, hi = m["ci95"]
    return f"{m['value']:.2f} [{lo:.2f}, {hi:.2f}] (n={m['n']})"


def write_frontier_report(out: Path, systems: list[dict], *, notes: list[str]) -> dict:
    out = Path(out)
    rows = load_rows(out, systems)
    lines = ["# KV-compression frontier", "",
             "| system | family | KV bytes/token | KV kept | ppl modern | ppl Hamlet | LAMBADA | needle | multi-key |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kv = "—" if r["kv_bytes_per_token"] is None else f"{r['kv_bytes_per_token']:.0f}"
        frac = "—" if r["kv_fraction"] is None else f"{r['kv_fraction']:.3f}"
        lines.append(f"| {r['name']} | {r['family']} | {kv} | {frac} | "
                     + " | ".join(_value(r, m) for m, _ in PLOTTED) + " |")
    lines += ["", "KV bytes/token: the bytes of every tensor the cache object holds right after prefilling held-out "
              "text (quantized codes, scales, zero points and full-precision residual included), over the context "
              "tokens; KV kept: that over the original's. Every answer is read from the stored cache after the context "
              "was prefilled into it (no full-precision prefill of the question). Perplexity: each window's prefix is "
              "prefilled, the rest read from the cache in chunks and scored (kvpress presses prune at the prefill only; "
              "QuantizedCache keeps up to 128 recent tokens in full precision and quantizes the rest). SnapKV keeps "
              "contexts no longer than its 64-token scoring window whole (short LAMBADA passages). The model runs "
              "in fp32 on CPU, so the original's cache is fp32: against a 16-bit cache a quantized cache keeps twice "
              "the fraction shown, and MEA the same fraction. Proportions: [95% Wilson interval] (n)."]
    lines += (_sizes(out, rows) + _targets(rows) + _stacked_vs_2bit(rows) + _needle_cells(rows) + _chat(rows)
              + [f"- {n}" for n in notes])
    write_text_atomic(out / "report.md", "\n".join(lines) + "\n")
    write_json_atomic(out / "summary.json", {"rows": rows, "notes": notes})
    if rows:
        _plot(out / "frontier.png", rows)
    return {"report": str(out / "report.md"), "systems": [r["name"] for r in rows]}


SIZE_FIELDS = {"bytes": ("bytes_context",), "ppl_modern": ("ppl_windows", "ppl_window", "ppl_prefix", "ppl_chunk"),
               "ppl_shakespeare": ("ppl_windows", "ppl_window", "ppl_prefix", "ppl_chunk"), "lambada": ("lambada",),
               "needle": ("needle_lengths", "needle_depths", "needle_trials"),
               "multikey": ("multikey_lengths", "multikey_keys", "multikey_trials"), "chat": ("chat_tokens",)}


def _sizes(out: Path, rows: list[dict]) -> list[str]:
    """The sizes each measure ran at (from its result files; they differ where a measure ran at other sizes)."""
    seen: dict[str, set] = {}
    for f in sorted((out / "systems").glob("*.json")):
        data = json.loads(f.read_text())
        if any(data.get("name") == r["name"] for r in rows):
            fields = SIZE_FIELDS.get(data["measure"], ())
            seen.setdefault(data["measure"], set()).add(json.dumps({k: data["sizes"][k] for k in fields}))
    cpu = rows[0].get("cpu_capability") if rows else None
    return ["", "Sizes: " + "; ".join(f"{m} {' or '.join(sorted(v))}" for m, v in seen.items())
            + f"; CPU capability {cpu}."] if seen else []


def _found_cells(row: dict) -> set:
    return {(c["length"], c["depth"]) for c in row["measures"]["needle"]["cells"] if c["accuracy"] > 0.5}


def target_checks(row: dict, original: dict) -> dict | None:
    """The MEA system's measures against the original's, with its level's targets; None when it has none."""
    target = TARGETS.get(row.get("level"))
    if target is None:
        return None
    mine, theirs = row["measures"], original["measures"]
    checks = {}
    for domain in ("modern", "shakespeare"):
        m = f"ppl_{domain}"
        if m in mine and m in theirs:
            ratio = mine[m]["ppl"] / theirs[m]["ppl"]
            checks[m] = {"ratio": ratio, "target": target[0], "met": ratio <= target[0]}
    if "lambada" in mine and "lambada" in theirs and theirs["lambada"]["value"] > 0:
        ratio = mine["lambada"]["value"] / theirs["lambada"]["value"]
        checks["lambada"] = {"ratio": ratio, "target": target[1], "met": ratio >= target[1]}
    if "needle" in mine and "needle" in theirs and _found_cells(original):
        share = len(_found_cells(row) & _found_cells(original)) / len(_found_cells(original))
        checks["needle"] = {"share": share, "cells": len(_found_cells(original)), "target": target[2],
                            "met": share >= target[2]}
    return checks


def _targets(rows: list[dict]) -> list[str]:
    checked = [(r, r["targets"]) for r in rows if r.get("targets")]
    if not checked:
        return []
    lines = ["", "## Quality targets of the MEA systems (against the original)", "",
             "Perplexity at most 1.05x / 1.15x the original's, LAMBADA at least 0.9x / 0.8x, the needle found in "
             "all / 90% of the cells the original finds (a cell is found when most of its trials are), at KV "
             "kept 0.67 / 0.5.", "",
             "| system | ppl modern ratio | ppl Hamlet ratio | LAMBADA ratio | needle cells kept |", "|---|---|---|---|---|"]

    def cell(c: dict | None, key: str) -> str:
        if c is None:
            return "—"
        value = f"{c[key]:.0%} of {c['cells']}" if key == "share" else f"{c[key]:.3f}x"
        return f"{value} ({'met' if c['met'] else 'missed'})"

    for r, c in checked:
        lines.append(f"| {r['name']} | {cell(c.get('ppl_modern'), 'ratio')} | {cell(c.get('ppl_shakespeare'), 'ratio')} "
                     f"| {cell(c.get('lambada'), 'ratio')} | {cell(c.get('needle'), 'share')} |")
    return lines


def stacked_vs_2bit(mine: dict, theirs: dict) -> dict:
    """Per measure both have, whether `mine` (MEA with our quantized cache) does better than `theirs` (a 2-bit
    QuantizedCache) and, for proportions, whether their 95% intervals overlap."""
    out = {}
    for m, _ in PLOTTED:
        a, b = mine["measures"].get(m), theirs["measures"].get(m)
        if a is None or b is None:
            continue
        if m.startswith("ppl_"):
            out[m] = {"mine": a["ppl"], "theirs": b["ppl"], "better": a["ppl"] < b["ppl"], "overlap": False}
        else:
            overlap = a["ci95"][0] <= b["ci95"][1] and b["ci95"][0] <= a["ci95"][1]
            out[m] = {"mine": a["value"], "theirs": b["value"], "better": a["value"] > b["value"], "overlap": overlap}
    return out


ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
STACKED_TARGET = 1 / 8  # MEA with a 4-bit cache at this share of a 16-bit cache or less beats 2-bit caches


def sixteen_bit_bytes(rows: list[dict]) -> float | None:
    """The original's KV bytes per token had its cache been 16-bit (the study may run in fp32)."""
    original = next((r for r in rows if r["name"] == "original"), None)
    size = original and ELEMENT_BYTES.get(original.get("precision"))
    return original["kv_bytes_per_token"] * 2 / size if size and original["kv_bytes_per_token"] else None


def _stacked_vs_2bit(rows: list[dict]) -> list[str]:
    """Every MEA system with our quantized cache against every 2-bit QuantizedCache holding at least its bytes,
    and the target: at STACKED_TARGET of a 16-bit cache or less, better on every measure."""
    stacked = [r for r in rows if r["name"].startswith("mea-") and "+int" in r["name"] and r["kv_bytes_per_token"]]
    two_bit = [r for r in rows if r["family"].endswith("(QuantizedCache)") and r["name"].endswith("-2")
               and r["kv_bytes_per_token"]]
    pairs = [(a, b) for a in stacked for b in two_bit if a["kv_bytes_per_token"] <= b["kv_bytes_per_token"]]
    if not pairs:
        return []
    base = sixteen_bit_bytes(rows)
    lines = ["", "## MEA with our quantized cache against 2-bit quantization, at no more bytes", "",
             "Each cell: ours vs theirs; `better` / `worse` for ours, `(overlap)` where the 95% intervals of a "
             "proportion overlap; `of 16-bit`: our bytes over the original's cache at 16 bits.", "",
             "| ours | bytes | of 16-bit | 2-bit | bytes | " + " | ".join(t for _, t in PLOTTED)
             + " | ours better on |",
             "|---|---|---|---|---|" + "---|" * len(PLOTTED) + "---|"]
    wins = {}  # each stacked system at STACKED_TARGET or less: better on every measure against every 2-bit cache
    for a, b in pairs:
        cmp = stacked_vs_2bit(a, b)
        cells = []
        for m, _ in PLOTTED:
            c = cmp.get(m)
            cells.append("—" if c is None else f"{c['mine']:.3g} vs {c['theirs']:.3g} "
                         f"{'better' if c['better'] else 'worse'}{' (overlap)' if c['overlap'] else ''}")
        won = sum(c["better"] for c in cmp.values())
        share = a["kv_bytes_per_token"] / base if base else None
        if share is not None and share <= STACKED_TARGET + 1e-9:
            wins[a["name"]] = wins.get(a["name"], True) and won == len(cmp) == len(PLOTTED)
        lines.append(f"| {a['name']} | {a['kv_bytes_per_token']:.0f} | {'—' if share is None else f'{share:.3f}'} | "
                     f"{b['name']} | {b['kv_bytes_per_token']:.0f} | " + " | ".join(cells)
                     + f" | {won} of {len(cmp)} measured |")
    if wins:
        met = sorted(n for n, won_all in wins.items() if won_all)
        lines += ["", f"Target: at 1/{round(1 / STACKED_TARGET)} of a 16-bit cache or less "
                  f"({base * STACKED_TARGET:.0f} bytes a token), better than every 2-bit cache on all {len(PLOTTED)} "
                  "measures: " + (f"met by {', '.join(met)}" if met else "met by none")
                  + f" ({len(wins)} such system(s) measured)."]
    return lines


def _needle_cells(rows: list[dict]) -> list[str]:
    with_needle = [r for r in rows if "needle" in r["measures"]]
    if not with_needle:
        return []
    cells = [(c["length"], c["depth"]) for c in with_needle[0]["measures"]["needle"]["cells"]]
    lengths = sorted({c[0] for c in cells})
    lines = ["", "## Needle retrieval by context length (pooled over depths)", "",
             "| system | " + " | ".join(str(n) for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for r in with_needle:
        by = {}
        for c in r["measures"]["needle"]["cells"]:
            by.setdefault(c["length"], []).append(c["accuracy"])
        lines.append(f"| {r['name']} | " + " | ".join(f"{sum(by[n]) / len(by[n]):.2f}" if n in by else "—"
                                                      for n in lengths) + " |")
    return lines


EMPTY_ANSWER = "*(nothing: its first token ends the turn)*"


def _chat(rows: list[dict]) -> list[str]:
    with_chat = [r for r in rows if "chat" in r["measures"]]
    if not with_chat:
        return []
    lines = ["", "## Fixed chat prompts (greedy, answered from the cache)", ""]
    for i, prompt in enumerate(a["prompt"] for a in with_chat[0]["measures"]["chat"]["answers"]):
        lines += [f"**{prompt}**", "", "| system | answer |", "|---|---|"]
        for r in with_chat:
            answer = r["measures"]["chat"]["answers"][i]["answer"].replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {r['name']} | {answer or EMPTY_ANSWER} |")
        lines.append("")
    return lines


def _style(family: str) -> str:
    """A marker per kind of system, so that a colour shared by two families still tells them apart."""
    if family == "original":
        return "*"
    if family.endswith("cache"):  # MEA or the original with our quantized cache
        return "D"
    return {"kvpress": "^", "MEA": "o"}.get(family.split(" ")[0], "s")  # QuantizedCache: squares


PPL_CUT = 20  # perplexity axes stop at this multiple of the original's (the training-free svd reaches 1000x)


def _plot(path: Path, rows: list[dict]) -> None:
    plt = pyplot()
    families = list(dict.fromkeys(r["family"] for r in rows))
    height = max(3.6, 0.15 * len(families) + 0.8)  # the key lists every family at 7 points a line
    fig, (*axes, key) = plt.subplots(1, len(PLOTTED) + 1, figsize=(4 * len(PLOTTED) + 3, height),
                                     gridspec_kw={"width_ratios": [4] * len(PLOTTED) + [3]})
    colours = plt.get_cmap("tab20")
    original = {r["name"]: r for r in rows}.get("original")
    for ax, (measure, title) in zip(axes, PLOTTED):
        for i, fam in enumerate(families):
            pts = sorted(((r["kv_fraction"], r["measures"][measure]) for r in rows  # seeds share a fraction
                          if r["family"] == fam and r["kv_fraction"] is not None and measure in r["measures"]),
                         key=lambda p: p[0])
            if not pts:
                continue
            xs, style = [p[0] for p in pts], dict(marker=_style(fam), color=colours(i % 20), label=fam)
            if measure.startswith("ppl_"):
                ax.plot(xs, [p[1]["ppl"] for p in pts], **style)
            else:
                ys = [p[1]["value"] for p in pts]
                # clipped at 0: a Wilson bound can miss an accuracy of exactly 0 or 1 by a rounding error
                err = [[max(0.0, y - p[1]["ci95"][0]) for y, p in zip(ys, pts)],
                       [max(0.0, p[1]["ci95"][1] - y) for y, p in zip(ys, pts)]]
                ax.errorbar(xs, ys, yerr=err, capsize=2, **style)
        ax.set_xlabel("KV bytes held / original's")
        ax.grid(alpha=0.3)
        if measure.startswith("ppl_"):
            ax.set_yscale("log")
            if original and measure in original["measures"]:
                base = original["measures"][measure]["ppl"]
                ax.set_ylim(base / 1.2, base * PPL_CUT)
                title += f" (cut at {PPL_CUT}x the original)"
        ax.set_title(title, fontsize=9)
    handles = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}  # every family once
    key.axis("off")
    key.legend(handles.values(), handles.keys(), loc="center", fontsize=7)
    save_figure(fig, path, dpi=110)
