"""Group-wise KV quantization primitives on real keys and values, on CPU: ours (`mea.ops.kvquant`) against
torchao's affine quantization, optimum-quanto and HQQ, at 8 and 4 bits and several group sizes, with keys per
channel and values per token (KIVI). Writes one JSON (machine header, settings, results):

    python scripts/kv_quant_primitives.py [--out results/kv-quant/primitives.json] [--tokens 1024]

Data: the keys (after RoPE) and values of every layer of the embedded SmolLM2-135M over the first `tokens`
tokens of the modern held-out text. Error: relative Frobenius error of the round trip, per layer, averaged;
and the error of the attention logits q.k of the last query against every key (what decoding sees). Time:
median CPU seconds of quantizing and of dequantizing every layer once (one thread, process time, so the
shared machine's other load counts less). Bytes: codes plus scales and zero points per element, as each
library stores them (torchao's quantize_affine leaves 4-bit codes one per byte; `packed` says so).

torchao is not installed by `make setup` (installed, it is imported by transformers at start-up and prints
warnings on every command): `pip install torchao==0.18.0` to include it; a library that is missing is
recorded as such in the JSON.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch


def collect(tokens: int):
    """Per layer: keys, values (1, H, S, D) after RoPE, and the last position's queries (1, N, D)."""
    from transformers import DynamicCache

    from mea.convert import load_source
    from mea.data import heldout_text

    source = load_source("smollm2")
    model, tok = source.model.eval(), source.tokenizer
    ids = tok(heldout_text("modern"), add_special_tokens=False, return_tensors="pt").input_ids[:, :tokens]
    queries = {}

    def hook(layer):
        def grab(module, args, kwargs, out):
            hidden = kwargs["hidden_states"]
            cos, sin = kwargs["position_embeddings"]
            from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

            q = module.q_proj(hidden[:, -1:]).view(1, 1, -1, module.head_dim).transpose(1, 2)  # (1, N, 1, D)
            q, _ = apply_rotary_pos_emb(q, q, cos[:, -1:], sin[:, -1:])
            queries[layer] = q[0, :, 0]
        return grab

    handles = [layer.self_attn.register_forward_hook(hook(i), with_kwargs=True)
               for i, layer in enumerate(model.model.layers)]
    cache = DynamicCache()
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    for h in handles:
        h.remove()
    return [(layer.keys, layer.values, queries[i]) for i, layer in enumerate(cache.layers)]


def grouped_last(x: torch.Tensor, keys: bool) -> torch.Tensor:
    """(1, H, S, D) -> rows whose last dimension holds the groups: keys per channel (groups of tokens: the
    sequence last), values per token (groups of features)."""
    return x.transpose(-1, -2).contiguous() if keys else x.contiguous()


def back(rows: torch.Tensor, keys: bool, like: torch.Tensor) -> torch.Tensor:
    """Inverse of `grouped_last` (+ flattening to rows), shaped like `like`."""
    y = rows.reshape(grouped_last(like, keys).shape)
    return y.transpose(-1, -2) if keys else y


# --- one round trip per library: (quantize(x, bits, g) -> state, dequantize(state) -> x^, bytes of state) ---

def ours(keys: bool):
    from mea.ops.kvquant import dequantize_keys, dequantize_values, quantize_keys, quantize_values

    q, d = (quantize_keys, dequantize_keys) if keys else (quantize_values, dequantize_values)
    return (lambda x, bits, g: (q(x, bits, g), bits),
            lambda state: d(*state[0], state[1], torch.float32),
            True)


def torchao_affine(keys: bool):
    from torchao.quantization.quant_primitives import (
        MappingType,
        choose_qparams_affine,
        dequantize_affine,
        quantize_affine,
    )

    def quantize(x, bits, g):
        block = (1, 1, g, 1) if keys else (1, 1, 1, g)
        hi = 2**bits - 1
        s, z = choose_qparams_affine(x, MappingType.ASYMMETRIC, block, torch.uint8, quant_min=0, quant_max=hi,
                                     scale_dtype=torch.float16, zero_point_dtype=torch.float16)
        return (quantize_affine(x, block, s, z, torch.uint8, 0, hi), s, z, block, hi)

    def dequantize(state):
        codes, s, z, block, hi = state
        return dequantize_affine(codes, block, s, z, torch.uint8, 0, hi, output_dtype=torch.float32)

    return quantize, dequantize, False


def quanto(keys: bool):
    from optimum.quanto import AbsmaxOptimizer, MaxOptimizer, qint4, qint8, quantize_weight

    def quantize(x, bits, g):  # quanto's 8-bit weights are symmetric (absmax, no zero point)
        rows = grouped_last(x, keys).reshape(-1, x.shape[2] if keys else x.shape[3])
        if bits == 8:  # per-axis only: one row per group
            rows = rows.reshape(-1, g)
            return quantize_weight(rows, qint8, 0, AbsmaxOptimizer()(rows, qint8, 0)), x
        scale, shift = MaxOptimizer()(rows, qint4, 0, g)
        return quantize_weight(rows, qint4, 0, scale, shift, g), x

    def dequantize(state):
        qt, like = state
        return back(qt.dequantize(), keys, like)

    return quantize, dequantize, True


def hqq(keys: bool):
    from hqq.core.quantize import Quantizer

    def quantize(x, bits, g):
        rows = grouped_last(x, keys).reshape(-1, x.shape[2] if keys else x.shape[3])
        codes, meta = Quantizer.quantize(rows, nbits=bits, group_size=g, axis=1, compute_dtype=torch.float32,
                                         device="cpu")
        return codes, meta, x

    def dequantize(state):
        codes, meta, like = state
        return back(Quantizer.dequantize(codes, meta), keys, like)

    return quantize, dequantize, True


LIBRARIES = {"mea (hand-written)": ours, "torchao affine": torchao_affine, "optimum-quanto": quanto, "hqq": hqq}


def state_bytes(state) -> int:
    from mea.cache import _tensor_bytes

    seen: set[int] = set()
    if isinstance(state, tuple) and len(state) == 3 and isinstance(state[1], dict):  # hqq: codes, meta, like
        state = (state[0], {k: v for k, v in state[1].items() if isinstance(v, torch.Tensor)})
    elif isinstance(state, tuple) and isinstance(state[-1], torch.Tensor) and state[-1].dtype == torch.float32:
        state = state[:-1]  # the reference tensor kept for the shape
    return _tensor_bytes(state, seen)


def cpu_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def evaluate(data, library: str, bits: int, group: int, repeats: int) -> dict:
    out = {"library": library, "bits": bits, "group_size": group}
    for keys, what in ((True, "keys"), (False, "values")):
        quantize, dequantize, packed = LIBRARIES[library](keys)
        tensors = [k if keys else v for k, v, _ in data]
        states = [quantize(x, bits, group) for x in tensors]
        recon = [dequantize(s).float().reshape(x.shape) for s, x in zip(states, tensors)]
        rel = [((r - x).norm() / x.norm()).item() for r, x in zip(recon, tensors)]
        entry = {"relative_error": statistics.mean(rel), "max_abs_error": max((r - x).abs().max().item()
                                                                              for r, x in zip(recon, tensors)),
                 "bytes_per_element": sum(state_bytes(s) for s in states) / sum(x.numel() for x in tensors),
                 "codes_packed": packed,
                 "quantize_cpu_s": cpu_seconds(lambda: [quantize(x, bits, group) for x in tensors], repeats),
                 "dequantize_cpu_s": cpu_seconds(lambda: [dequantize(s) for s in states], repeats)}
        if keys:  # logits of the last query against every key, relative error (GQA: query heads share a KV head)
            errs = []
            for (k, _, q), r in zip(data, recon):
                group_of = q.shape[0] // k.shape[1]
                exact = torch.einsum("nd,nsd->ns", q, k[0].repeat_interleave(group_of, 0))
                approx = torch.einsum("nd,nsd->ns", q, r[0].repeat_interleave(group_of, 0))
                errs.append(((approx - exact).norm() / exact.norm()).item())
            entry["logit_relative_error"] = statistics.mean(errs)
        out[what] = entry
    return out


def main(argv=None) -> int:
    from mea.atomic import write_json_atomic
    from mea.machine import machine_header

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results/kv-quant/primitives.json")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--groups", type=int, nargs="+", default=[32, 64], help="must divide head_dim (64)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = collect(args.tokens)
    head_dim = data[0][0].shape[-1]
    if any(head_dim % g or args.tokens % g for g in args.groups):
        raise SystemExit(f"--groups must divide head_dim ({head_dim}) and --tokens ({args.tokens}), got {args.groups}")
    results, missing = [], {}
    for library in LIBRARIES:
        for bits in (8, 4):
            for group in args.groups:
                try:
                    results.append(evaluate(data, library, bits, group, args.repeats))
                except ImportError as e:
                    missing[library] = str(e)
                    break
                print(f"{library} int{bits} g{group}: keys {results[-1]['keys']['relative_error']:.4f} "
                      f"values {results[-1]['values']['relative_error']:.4f}", flush=True)
    write_json_atomic(Path(args.out), {
        "benchmark": "kv-quant-primitives", "machine": machine_header(torch.device("cpu")),
        "settings": {"model": "smollm2 (embedded SmolLM2-135M)", "tokens": args.tokens, "groups": args.groups,
                     "repeats": args.repeats, "threads": 1, "layers": len(data)},
        "results": results, "unavailable": missing})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
