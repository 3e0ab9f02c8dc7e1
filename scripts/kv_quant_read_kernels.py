"""The two products of a decode step's read of a quantized cache, candidate kernels side by side on CPU: the
key logits q . K^T (a sum over the D features) and the value output p . V (a sum over the S tokens), for
SmolLM2-135M's shapes (an uncompressed layer: 3 KV heads of 64, 3 query rows each; a compressed layer at
h' = 2: one 128-wide head, 9 query rows), batch 1.

Candidates: the float cache (plain matmuls); ours (`ops.attention`: keys per channel converted a block at a
time or read by the fused C++ kernel `ops.fused_keys`, values as planes read by the same extension's fused
kernel, by torch's packed int4 matmul, or converted blocks); torch's packed low-bit
matmuls `_weight_int8pack_mm` (x @ W^T, W int8 with one scale per output row) and
`_weight_int4pack_mm_for_cpu` (W int4 with a scale and zero point per output row and group of 32-256 of the
summed features). Those take scales that vary along W's rows (keys: per token; values: per feature), never
per summed feature and group of tokens, so KIVI's per-channel keys do not fit them: their key rows here are
quantized per token (the accuracy cost: `kv_quant_key_layout.py`). For values, per-token scales fold into p,
so W = V^T with unit scales fits both (int8: V^T stored transposed; int4: our planes).

torch's packed kernels are measured in float32 only up to `SLOW_FLOAT32_CONTEXT` tokens: there they run a
scalar path, 10-100x slower than in bfloat16. Median wall and CPU (process) milliseconds over interleaved repeats, at 1 and 2 threads, in float32 and
bfloat16 compute, at batch 1 or more (torch's packed kernels: batch 1 only). Writes one JSON:

    python scripts/kv_quant_read_kernels.py [--contexts 4096 16384] [--batches 1] [--products keys values] \
        [--shapes uncompressed compressed] [--out results/kv-quant/read-kernels.json]

The value-read table: `--products values --contexts 4096 16384 32768 --batches 1 8 --threads 1 --repeats 5
--out results/kv-quant/value-read.json`.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

import torch

from mea.ops import attention as ops
from mea.ops import fused_keys
from mea.ops.kvquant import QuantizedTokens, quantize_keys, quantize_values

SHAPES = {"uncompressed (3 heads of 64)": (3, 3, 64), "compressed h'=2 (one head of 128)": (1, 9, 128)}
SHAPE_IDS = dict(zip(("uncompressed", "compressed"), SHAPES))  # --shapes
GROUP = 64
SLOW_FLOAT32_CONTEXT = 4096  # torch's packed kernels in float32 (a scalar path, 10-100x slower): only up to here


def candidates(kv_heads: int, rows: int, width: int, context: int, dtype: torch.dtype, batch: int = 1,
               products: tuple[str, ...] = ("keys", "values")) -> dict:
    """(product, kernel, bits) -> zero-argument call over random keys/values of one layer, `products` only."""
    out = _all_candidates(kv_heads, rows, width, context, dtype, batch, products)
    return {key: fn for key, fn in out.items() if key[0] in products}


def _all_candidates(kv_heads, rows, width, context, dtype, batch, products) -> dict:
    b, g, r, e, s = batch, kv_heads, rows, width, context
    q = torch.randn(b, g, r, e, dtype=dtype)
    k = torch.randn(b, g, s, e, dtype=dtype)
    v = torch.randn(b, g, s, e, dtype=dtype) if "values" in products else None
    p = torch.softmax(torch.randn(b, g, r, s), dim=-1)
    width_bits = 16 if dtype == torch.bfloat16 else 32
    out = {("keys", "float", width_bits): lambda: q @ k.transpose(-1, -2)}
    if v is not None:
        out[("values", "float", width_bits)] = lambda: p.to(dtype) @ v
    tail = k[:, :, :0]
    for bits in (8, 4):
        keys = QuantizedTokens(*quantize_keys(k, bits, GROUP), tail, bits, GROUP, per_channel=True)
        scores = torch.empty(b, g, r, s)
        out[("keys", "ours (per channel, blocks)", bits)] = lambda keys=keys: ops._key_scores_blocks(q, keys, scores)
        if fused_keys.load() is not None:
            out[("keys", "ours (per channel, fused C++)", bits)] = lambda keys=keys: fused_keys.key_scores(
                q, keys.codes, keys.scale, keys.zero, scores, bits=keys.bits, group_size=keys.group_size)
        if v is None:
            continue
        values = QuantizedTokens(*quantize_values(v, bits, GROUP), tail, bits, GROUP, per_channel=False)
        acc = torch.zeros(b, g, r, e)
        block = ops.DEQUANT_BLOCK
        out[("values", "ours (blocks)", bits)] = lambda values=values: ops._values_blocks(p, values, acc, block)
        if fused_keys.load() is not None:
            out[("values", "ours (planes, fused C++)", bits)] = lambda values=values: fused_keys.value_sums(
                p, values.codes, values.scale, values.zero, acc, bits=values.bits, group_size=values.group_size)
        if ops.int4pack_layout_matches():
            out[("values", "ours (planes, torch int4pack, bf16)", bits)] = (
                lambda values=values: ops._values_int4pack(p, values, acc))
    if batch > 1 or v is None or (dtype == torch.float32 and context > SLOW_FLOAT32_CONTEXT):
        return out
    x = q[0].to(dtype)
    k8 = torch.randint(-128, 128, (g, s, e), dtype=torch.int8)  # per-token int8 keys: one scale per row
    k8_scale = torch.rand(g, s, dtype=dtype)
    out[("keys", "torch int8pack (per token)", 8)] = lambda: [torch._weight_int8pack_mm(x[h], k8[h], k8_scale[h])
                                                              for h in range(g)]
    vt8 = torch.randint(-128, 128, (g, e, s), dtype=torch.int8)  # V^T, per-token scales folded into p
    ones = torch.ones(e, dtype=dtype)
    pw = p[0].to(dtype)
    out[("values", "torch int8pack (V^T)", 8)] = lambda: [torch._weight_int8pack_mm(pw[h], vt8[h], ones)
                                                          for h in range(g)]
    if hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"):
        k4 = torch._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (g * s, e), dtype=torch.int32), 1)
        k4 = k4.view(g, s, e // 2)
        k4_sz = torch.rand(g, e // GROUP, s, 2, dtype=dtype)
        out[("keys", "torch int4pack (per token)", 4)] = lambda: [
            torch._weight_int4pack_mm_for_cpu(x[h], k4[h], GROUP, k4_sz[h]) for h in range(g)]
    return out


def timed(fn, repeats: int) -> tuple[list[float], list[float]]:
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return wall, cpu


def main(argv=None) -> int:
    from mea.atomic import write_json_atomic
    from mea.machine import machine_header

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--batches", type=int, nargs="+", default=[1])
    p.add_argument("--products", nargs="+", default=["keys", "values"], choices=["keys", "values"])
    p.add_argument("--shapes", nargs="+", default=list(SHAPE_IDS), choices=list(SHAPE_IDS))
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default="results/kv-quant/read-kernels.json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    results = []
    with torch.no_grad():
        for threads in args.threads:
            torch.set_num_threads(threads)
            for dtype_name in args.dtypes:
                dtype = getattr(torch, dtype_name)
                for batch, context, shape_id in itertools.product(args.batches, args.contexts, args.shapes):
                    shape = SHAPE_IDS[shape_id]
                    calls = candidates(*SHAPES[shape], context, dtype, batch, tuple(args.products))
                    times = {key: ([], []) for key in calls}
                    for _ in range(3):  # interleaved rounds: drifts of the shared machine hit all alike
                        for key, fn in calls.items():
                            wall, cpu = timed(fn, args.repeats)
                            times[key][0].extend(wall)
                            times[key][1].extend(cpu)
                    for (product, kernel, bits), (wall, cpu) in times.items():
                        results.append({"threads": threads, "dtype": dtype_name, "batch": batch, "context": context,
                                        "shape": shape, "product": product, "kernel": kernel, "bits": bits,
                                        "wall_ms": statistics.median(wall) * 1e3,
                                        "cpu_ms": statistics.median(cpu) * 1e3})
                        print(f"{threads}t {dtype_name} b{batch} {context} {shape} {product} {kernel} {bits}: "
                              f"{results[-1]['cpu_ms']:.3f} CPU ms", flush=True)
    write_json_atomic(Path(args.out), {
        "benchmark": "kv-quant-read-kernels", "machine": machine_header(torch.device("cpu")),
        "settings": {"contexts": args.contexts, "batches": args.batches, "threads": args.threads,
                     "dtypes": args.dtypes, "products": args.products, "shapes": args.shapes,
                     "repeats": 3 * args.repeats, "group_size": GROUP},
        "results": results})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
