"""What keys lose when quantized per token (the only layout torch's packed low-bit matmuls can read) instead
of per channel (KIVI, what the cache stores), on the real keys (after RoPE) of every layer of the embedded
SmolLM2-135M: relative error of the keys, of the last query's attention logits, and of that query's attention
output (softmax(q K^T / 8) V with exact values), averaged over layers; per token also after a 64 x 64
Hadamard rotation of keys and queries (QuaRot's remedy for outlier channels, exact in q . k). Writes one JSON:

    python scripts/kv_quant_key_layout.py [--tokens 1024] [--out results/kv-quant/key-layout.json]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from kv_quant_primitives import collect
from mea.ops.kvquant import dequantize_keys, dequantize_values, quantize_keys, quantize_values


def hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5


def per_token(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    return dequantize_values(*quantize_values(x, bits, group), bits, torch.float32)


def layouts(head_dim: int) -> dict:
    rot = hadamard(head_dim)
    return {
        "per channel, groups of 64 tokens (KIVI, stored)": lambda k, b: dequantize_keys(*quantize_keys(k, b, 64), b,
                                                                                         torch.float32),
        "per token, groups of 64 features": lambda k, b: per_token(k, b, 64),
        "per token, groups of 32 features": lambda k, b: per_token(k, b, 32),
        "per token, 64 features, Hadamard-rotated": lambda k, b: per_token(k @ rot, b, 64) @ rot.t(),
        "per token, 32 features, Hadamard-rotated": lambda k, b: per_token(k @ rot, b, 32) @ rot.t(),
    }


def main(argv=None) -> int:
    from mea.atomic import write_json_atomic
    from mea.machine import machine_header

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--out", default="results/kv-quant/key-layout.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = collect(args.tokens)
    results = []
    for bits in (8, 4):
        for name, round_trip in layouts(data[0][0].shape[-1]).items():
            rel, logits, outputs = [], [], []
            for k, v, q in data:
                r = round_trip(k, bits)
                rel.append(((r - k).norm() / k.norm()).item())
                n = q.shape[0] // k.shape[1]
                kk, rr, vv = (x[0].repeat_interleave(n, 0) for x in (k, r, v))
                exact, approx = (torch.einsum("nd,nsd->ns", q, x) for x in (kk, rr))
                logits.append(((approx - exact).norm() / exact.norm()).item())
                out = [torch.einsum("ns,nsd->nd", torch.softmax(x / 8, -1), vv) for x in (exact, approx)]
                outputs.append(((out[1] - out[0]).norm() / out[0].norm()).item())
            results.append({"bits": bits, "layout": name, "key_relative_error": statistics.mean(rel),
                            "logit_relative_error": statistics.mean(logits),
                            "output_relative_error": statistics.mean(outputs)})
            print(f"int{bits} {name}: keys {results[-1]['key_relative_error']:.4f} "
                  f"logits {results[-1]['logit_relative_error']:.4f} output {results[-1]['output_relative_error']:.4f}",
                  flush=True)
    write_json_atomic(Path(args.out), {
        "benchmark": "kv-quant-key-layout", "machine": machine_header(torch.device("cpu")),
        "settings": {"model": "smollm2 (embedded SmolLM2-135M)", "tokens": args.tokens, "layers": len(data)},
        "results": results})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
