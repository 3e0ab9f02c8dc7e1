"""The kernel choices behind MEA's decode path, timed side by side on this machine (one decode step of one
layer, SmolLM2-135M shape: 9 query heads, 3 KV heads, head size 64, fp32):

  * plain GQA over a token-major (B, S, h, D) cache vs a head-major (B, h, S, D) one (what MEACache keeps
    for uncompressed layers);
  * the absorbed read of h' component heads: fused SDPA vs two explicit matmuls, and with the flash-decoding
    split over the context (`mea.ops.attention.decode_sdpa`) vs without;
  * and what bounds every system: the weight matrix-vector product (the tied 49152 x 576 embedding as
    lm_head) against a streaming read of the same bytes.

    python scripts/decode_kernels.py [--contexts 4096 32768] [--batches 1 8]

Prints a markdown table of median milliseconds per call.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mea.ops.attention import decode_sdpa


def median_ms(fn, repeats: int = 15) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def two_matmuls(q, k, v, scale):
    return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = p.parse_args()
    n, h, d, scale = 9, 3, 64, 0.125
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| batch | context | kernel | ms |\n|---|---|---|---|")
    for b in args.batches:
        for s in args.contexts:
            rows = []
            token_major = torch.randn(b, s, h, d), torch.randn(b, s, h, d)
            head_major = torch.randn(b, h, s, d), torch.randn(b, h, s, d)
            q = torch.randn(b, h, n // h, d)
            rows.append(("GQA, token-major cache, SDPA", lambda: F.scaled_dot_product_attention(
                q, token_major[0].transpose(1, 2), token_major[1].transpose(1, 2), scale=scale)))
            rows.append(("GQA, head-major cache, SDPA", lambda: F.scaled_dot_product_attention(
                q, *head_major, scale=scale)))
            rows.append(("GQA, head-major cache, decode_sdpa (split)", lambda: decode_sdpa(
                q, *head_major, mask=None, scale=scale)))
            for m in (2, 1):
                k, v, qa = torch.randn(b, 1, s, m * d), torch.randn(b, 1, s, m * d), torch.randn(b, 1, n, m * d)
                rows.append((f"absorbed h'={m}, two matmuls", lambda k=k, v=v, qa=qa: two_matmuls(qa, k, v, scale)))
                rows.append((f"absorbed h'={m}, SDPA", lambda k=k, v=v, qa=qa: F.scaled_dot_product_attention(
                    qa, k, v, scale=scale)))
                rows.append((f"absorbed h'={m}, decode_sdpa (split)", lambda k=k, v=v, qa=qa: decode_sdpa(
                    qa, k, v, mask=None, scale=scale)))
            for name, fn in rows:
                print(f"| {b} | {s} | {name} | {median_ms(fn):.2f} |")
    w, x = torch.randn(49152, 576), torch.randn(1, 576)
    gb = w.numel() * 4 / 1e9
    for name, fn in (("weight GEMV (F.linear, batch 1)", lambda: F.linear(x, w)), ("streaming read (sum)", w.sum)):
        ms = median_ms(fn)
        print(f"| 1 | - | {name}, {gb * 1e3:.0f} MB fp32: {gb / ms * 1e3:.1f} GB/s | {ms:.2f} |")


if __name__ == "__main__":
    main()
