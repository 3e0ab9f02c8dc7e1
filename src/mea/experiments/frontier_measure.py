"""Every frontier measure for one (model, cache system), each written to its own JSON file and skipped
when that file exists:

    python -m mea.experiments.frontier_measure MODEL OUTDIR --name NAME --system SYSTEM [--sizes JSON]

writes OUTDIR/NAME.MEASURE.json for MEASURE in `MEASURES`. It imports only what runs under both our
environment and the kvpress one (`.venv-peers`, transformers < 5.3), so the kvpress presses are measured
by this same code.

Held-out text: "modern" (the Debian Reference, never used for calibration or recovery) and "shakespeare"
(Hamlet). Needle and multi-key contexts are cut from the modern held-out text.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

MEASURES = ("bytes", "ppl_modern", "ppl_shakespeare", "lambada", "needle", "multikey", "chat")
STUDY_DTYPE = "fp32"  # the study measures in fp32 unless told otherwise: its numbers compare across machines


@dataclass(frozen=True)
class Sizes:
    """How much of each measure to run (the full study's defaults; `QUICK` for a smoke run)."""

    bytes_context: int = 2048  # tokens prefilled to measure the KV bytes held per token
    ppl_windows: int = 4
    ppl_window: int = 1024
    ppl_prefix: int = 512  # tokens prefilled into the cache; the rest is read from it in chunks
    ppl_chunk: int = 128
    lambada: int = 500
    needle_lengths: tuple = (512, 1024, 2048, 4096)
    needle_depths: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
    needle_trials: int = 3
    multikey_lengths: tuple = (1024, 2048, 4096)
    multikey_keys: int = 4
    multikey_trials: int = 10
    chat_tokens: int = 24
    seed: int = 0

    @classmethod
    def from_json(cls, text: str) -> "Sizes":
        data = json.loads(text) if text else {}
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown size field(s) {unknown}; known: {', '.join(f.name for f in fields(cls))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


QUICK = Sizes(bytes_context=1024, ppl_windows=2, ppl_window=512, ppl_prefix=256, lambada=100, needle_lengths=(512, 1024),
              needle_trials=1, multikey_lengths=(1024,), multikey_trials=5, chat_tokens=16)


def heldout_ids(tokenizer, domain: str):
    from ..data import heldout_text

    return tokenizer(heldout_text(domain), add_special_tokens=False, return_tensors="pt").input_ids[0]


def run_measure(measure: str, model, tokenizer, system, sizes: Sizes, log=print) -> dict:
    """One measure of `model` with the cache `system`, as a JSON-ready dict."""
    from ..data import token_windows
    from ..eval import cached_measures as cm
    from ..eval.needle import needle_grid
    from ..eval.protocol import prefill

    if measure == "bytes":
        state = prefill(model, system, heldout_ids(tokenizer, "modern")[: sizes.bytes_context])
        return {"context": state.position, "kv_bytes": state.kv_bytes, "kv_bytes_per_token": state.kv_bytes_per_token}
    if measure.startswith("ppl_"):
        domain = measure[4:]
        from ..data import heldout_text

        windows = token_windows(tokenizer, heldout_text(domain), window=sizes.ppl_window, count=sizes.ppl_windows,
                                what=f"the {domain} held-out text")
        return {"domain": domain, **cm.cached_perplexity(model, system, windows, prefix=sizes.ppl_prefix,
                                                          chunk=sizes.ppl_chunk)}
    if measure == "lambada":
        return cm.lambada_accuracy(model, tokenizer, system, limit=sizes.lambada, log=log)
    if measure == "needle":
        grid = needle_grid(model, tokenizer, lengths=list(sizes.needle_lengths), depths=list(sizes.needle_depths),
                           trials=sizes.needle_trials, seed=sizes.seed, log=log, system=system,
                           hay=heldout_ids(tokenizer, "modern"))
        found = [c["accuracy"] * c["trials"] for c in grid["cells"]]
        n = sum(c["trials"] for c in grid["cells"])
        return {**grid, **cm.proportion([True] * round(sum(found)) + [False] * (n - round(sum(found))))}
    if measure == "multikey":
        return cm.multikey_retrieval(model, tokenizer, system, heldout_ids(tokenizer, "modern"),
                                     lengths=list(sizes.multikey_lengths), keys=sizes.multikey_keys,
                                     trials=sizes.multikey_trials, seed=sizes.seed, log=log)
    if measure == "chat":
        return {"answers": cm.chat_answers(model, tokenizer, system, max_new_tokens=sizes.chat_tokens)}
    raise ValueError(f"unknown measure {measure!r}; choose from {', '.join(MEASURES)}")


def measure_system(model_src: str, out: str | Path, *, name: str, system: str, sizes: Sizes,
                   measures=MEASURES, device: str | None = None, dtype: str = STUDY_DTYPE, log=print,
                   load=None) -> list[Path]:
    """Run the missing measures of one system on `device` in `dtype` (`mea.precision.placement`); each result
    is written atomically as soon as it is done. `load(model_src, dtype)`: how the model is loaded (default
    `load_source`; the study passes one that reuses the model loaded for the previous system)."""
    import torch

    from ..atomic import write_json_atomic
    from ..convert import load_source
    from ..eval.peers import cache_system
    from ..precision import describe, placement

    out = Path(out)
    todo = [m for m in measures if not (out / f"{name}.{m}.json").exists()]
    if not todo:
        return []
    cache = cache_system(system)
    dev, dt = placement(device, dtype)
    source = (load or (lambda src, dt: load_source(src, dtype=dt)))(model_src, dt)
    source.model.to(dev)
    if source.tokenizer is None:
        raise ValueError(f"{model_src} has no tokenizer files; the frontier measures need one")
    written = []
    for m in todo:
        start = time.time()
        log(f"{name}: {m}")
        result = run_measure(m, source.model, source.tokenizer, cache, sizes, log=log)
        meta = {"name": name, "model": model_src, "system": system, "measure": m, "sizes": asdict(sizes),
                "seconds": round(time.time() - start, 1), "threads": torch.get_num_threads(),
                "cpu_capability": torch.backends.cpu.get_cpu_capability(), "placement": describe(dev, dt)}
        written.append(write_json_atomic(out / f"{name}.{m}.json", {**meta, "result": result}))
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mea.experiments.frontier_measure", description=__doc__.split("\n")[0])
    p.add_argument("model", help="'smollm2', a .gguf file or a checkpoint directory")
    p.add_argument("out", help="folder for NAME.MEASURE.json")
    p.add_argument("--name", required=True)
    p.add_argument("--system", default="default", help="default, quanto-4, hqq-2, kvpress-snapkv-0.5, ...")
    p.add_argument("--sizes", default="", help="JSON object overriding `Sizes` fields")
    p.add_argument("--measures", nargs="+", default=list(MEASURES), choices=MEASURES)
    p.add_argument("--device", help="cpu, cuda, cuda:N (default cuda when a GPU is visible, else cpu)")
    p.add_argument("--dtype", default=STUDY_DTYPE, help=f"auto, fp32 or bf16 (default {STUDY_DTYPE})")
    args = p.parse_args(argv)
    try:
        measure_system(args.model, args.out, name=args.name, system=args.system, sizes=Sizes.from_json(args.sizes),
                       measures=args.measures, device=args.device, dtype=args.dtype,
                       log=lambda m: print(m, file=sys.stderr, flush=True))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
