"""`mea` command line: each subcommand is a typed function of the library, called with parsed flags."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def cmd_info(model: str | None = None, bytes_per_element: int = 2) -> dict:
    from . import info

    out = {"versions": info.versions()}
    if model is None:
        out["registry"] = info.registry()
        return out
    cfg = info.resolve_config(model)
    out.update(model=model, model_type=cfg.model_type, parameters=info.count_parameters(cfg),
               layers=cfg.num_hidden_layers, query_heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
               **info.kv_report(cfg, bytes_per_element))
    return out


def cmd_fold(src: str, out: str, overwrite: bool = False) -> dict:
    from .checkpoint import load_causal_lm, save_atomic
    from .convert import export_plain
    from .models import MEAForCausalLM

    model = load_causal_lm(src)
    if not isinstance(model, MEAForCausalLM):
        raise ValueError(f"{src} is a {type(model).__name__}, not an MEA checkpoint; nothing to fold")
    plain = export_plain(model)
    save_atomic(plain, out, copy_from=src, overwrite=overwrite)
    return {"src": src, "out": out, "architecture": type(plain).__name__}


def cmd_demo(preset: str = "tiny", new_tokens: int = 32, context: int = 48, seed: int = 0) -> dict:
    from .demo import run_demo

    return run_demo(preset=preset, new_tokens=new_tokens, context=context, seed=seed)


def cmd_bench(what: str, out: str | None = None, **kwargs) -> dict:
    from .bench import bench_decode, bench_train

    result = {"train": bench_train, "decode": bench_decode}[what](**kwargs)
    if out:
        from .atomic import write_json_atomic

        write_json_atomic(out, result)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mea", description="Multi-head Explicit Attention: models, KV-cache compression, "
                                "benchmarks. Every subcommand prints JSON.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="versions and model registry; with MODEL, its size and KV-cache bytes per token")
    s.add_argument("model", nargs="?", help="a preset name or a checkpoint directory")
    s.add_argument("--bytes-per-element", type=int, default=2, help="cache element size (2: bf16/fp16, 4: fp32)")

    s = sub.add_parser("fold", help="fold HLC (h' = h) into k/v projections; export a plain Hugging Face checkpoint")
    s.add_argument("src")
    s.add_argument("out")
    s.add_argument("--overwrite", action="store_true")

    s = sub.add_parser("demo", help="build a small MEA model, generate with h' = h and h' = 1, measure the cache")
    s.add_argument("--preset", default="tiny")
    s.add_argument("--new-tokens", type=int, default=32)
    s.add_argument("--context", type=int, default=48)
    s.add_argument("--seed", type=int, default=0)

    s = sub.add_parser("bench", help="speed benchmarks (JSON with a machine header)")
    bench = s.add_subparsers(dest="what", required=True)
    b = bench.add_parser("train", help="forward+backward tokens/s: MEA vs baseline vs transformers Llama")
    b.add_argument("--preset", default="small")
    b.add_argument("--batch", type=int, default=8)
    b.add_argument("--seq", type=int, default=256)
    b.add_argument("--steps", type=int, default=5)
    b.add_argument("--repeats", type=int, default=3)
    b = bench.add_parser("decode", help="time per token from a long cache: h' = h vs compressed h'")
    b.add_argument("--preset", default="smollm2-135m")
    b.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384])
    b.add_argument("--component-heads", type=int, nargs="+", default=[3, 1])
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--steps", type=int, default=10)
    for b in bench.choices.values():
        b.add_argument("--device", default="cpu")
        b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        b.add_argument("--out", help="also write the JSON result here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    try:
        if command == "bench":
            result = cmd_bench(args.pop("what"), **args)
        else:
            result = {"info": cmd_info, "fold": cmd_fold, "demo": cmd_demo}[command](**args)
    except ValueError as e:
        print(f"mea {command}: error: {e}", file=sys.stderr)
        return 2
    json.dump(result, sys.stdout, indent=2, default=str)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
