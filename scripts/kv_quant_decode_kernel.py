"""One decode step's attention read of one layer, float cache vs quantized cache, side by side: CPU time
(process time, one thread) of `grouped_attention` (an uncompressed layer, h KV heads) and
`absorbed_attention` (a compressed layer, h' components) over a cache of S tokens, SmolLM2-135M's shapes
(9 query heads, 3 KV heads of 64). CPU time of one thread counts the work of the read, not the waits of a
shared machine, so the ratios are steadier than wall time there (`mea bench decode` gives the wall time of
whole models). Writes one JSON:

    python scripts/kv_quant_decode_kernel.py [--contexts 4096 16384] [--dtype float32] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from mea.cache import MEACache
from mea.ops import absorbed_attention, grouped_attention
from mea.ops.kvquant import DEFAULT_GROUP_SIZE, DEFAULT_RESIDUAL, KVQuant

HEADS, KV_HEADS, HEAD_DIM, COMPONENTS = 9, 3, 64, 2


def filled(tokens: int, dtype, quant, *, heads_first: bool, heads: int):
    """The (keys, values) a cache layer returns after holding `tokens` random tokens."""
    cache = MEACache(1, capacity=tokens, kv_quant=quant)
    for start in range(0, tokens, 1024):
        t = min(1024, tokens - start)
        out = cache.update(torch.randn(1, t, heads, HEAD_DIM, dtype=dtype),
                           torch.randn(1, t, heads, HEAD_DIM, dtype=dtype), 0, heads_first=heads_first)
    return out


def main(argv=None) -> int:
    from mea.atomic import write_json_atomic
    from mea.machine import machine_header

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default="results/kv-quant/decode-kernel.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    q = torch.randn(1, 1, HEADS, HEAD_DIM, dtype=dtype)
    w = torch.randn(COMPONENTS, KV_HEADS, dtype=dtype)
    caches = {"float": None, **{f"int{b}": KVQuant(b, DEFAULT_GROUP_SIZE, DEFAULT_RESIDUAL) for b in (8, 4)}}
    results = []
    with torch.no_grad():
        for context in args.contexts:
            calls = {}
            for name, quant in caches.items():
                k, v = filled(context, dtype, quant, heads_first=True, heads=KV_HEADS)
                calls[("grouped", name)] = lambda k=k, v=v: grouped_attention(q, k, v, mask=None, scale=0.125)
                k, v = filled(context, dtype, quant, heads_first=False, heads=COMPONENTS)
                calls[("absorbed", name)] = lambda k=k, v=v: absorbed_attention(q, k, v, w, w, mask=None, scale=0.125)
            times = {key: [] for key in calls}
            for _ in range(args.repeats):  # interleaved, so drifts of the machine hit every case alike
                for key, fn in calls.items():
                    t0 = time.process_time()
                    fn()
                    times[key].append(time.process_time() - t0)
            for (kernel, name), ts in times.items():
                ms = statistics.median(ts) * 1e3
                base = statistics.median(times[(kernel, "float")]) * 1e3
                results.append({"context": context, "kernel": kernel, "cache": name, "cpu_ms": ms,
                                "vs_float": base / ms, "all_ms": [t * 1e3 for t in ts]})
                print(f"{context} {kernel} {name}: {ms:.2f} ms ({base / ms:.2f}x of float)", flush=True)
    write_json_atomic(Path(args.out), {
        "benchmark": "kv-quant-decode-kernel", "machine": machine_header(torch.device("cpu")),
        "settings": {"contexts": args.contexts, "dtype": args.dtype, "repeats": args.repeats, "threads": 1,
                     "query_heads": HEADS, "kv_heads": KV_HEADS, "components": COMPONENTS, "head_dim": HEAD_DIM,
                     "group_size": DEFAULT_GROUP_SIZE, "timer": "process_time"},
        "results": results})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
