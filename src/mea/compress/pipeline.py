"""`mea compress`: source model -> MEA (identity HLC) -> calibration -> virtual heads per layer ->
optional layer-wise recovery -> checkpoint with provenance, and a report a user can read."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from pathlib import Path

import torch

from .. import precision
from ..atomic import atomic_dir
from ..checkpoint import check_output_dir, save_atomic
from ..console import log
from ..convert import load_source, to_mea
from ..data import calibration_windows, heldout_text, read_texts, token_windows
from ..eval import generate_and_measure, perplexity
from ..kv_setting import set_kv_quant
from ..ops.kvquant import KV_BITS
from ..machine import available_memory
from .calibrate import input_moments, key_moments
from .factor_model import error_curves, factor_model
from .methods import METHODS, method_of
from .plan import (LAYER_PRESETS, budget_plan, load_sensitivity, parse_layers, preset_layers, probe_width_splits,
                   uniform_plan, width_budget_plan, width_plan)
from .probe import PROBE_OBJECTIVES, probe_layers, quick_probe_loss
from .recover import FIT_MODES, layerwise_fit
from .streaming import Shards, check_streamable, compress_streamed, copy_tokenizer_files, finish

SAMPLE_PROMPT = "What is the capital of France? Answer in one sentence."


RECOVER_MODES = ("layerwise", "none")


PROBE_FILE = "probe.json"  # the probe's measurements, beside the model it sized

ALLOCATIONS = ("probe", "errors")  # how --kv-budget is spread (see CompressOptions.allocate)


@dataclass
class CompressOptions:
    method: str = field(  # svd: the paper's data-free SVD; whitened: activation-aware head mixing; rope-pair(-latent): finer mixing
        default="whitened", metadata={"choices": tuple(METHODS)})
    virtual_heads: int | None = None  # h' for the chosen layers
    layers: str | None = None  # layer ranges, e.g. "0-5,10" (default: the --preset layers)
    preset: str = field(  # layers compressed when --layers is not given
        default="full", metadata={"choices": LAYER_PRESETS})
    kv_budget: float | None = None  # fraction of the original KV bytes kept; h' per layer from sensitivity
    allocate: str = field(  # how --kv-budget is spread: probe (per-layer sizes by the measured loss of compressing each layer alone), errors (every layer the budget, split by its error curves: no probe pass)
        default="probe", metadata={"choices": ALLOCATIONS})
    sensitivity: str | None = None  # a probe table for --kv-budget: `mea probe`'s probe.json (whole heads), or the probe.json an earlier `mea compress --allocate probe` wrote beside its model (value-latent widths); else a quick probe runs
    probe_objective: str = field(  # the quick probe's loss: next-token (text), planted answers (retrieval), or both
        default="text", metadata={"choices": PROBE_OBJECTIVES})
    probe_floor: float = 0.0  # the least share of its cache the probe's allocation leaves a layer (0: any width probed)
    calib: list[str] = field(default_factory=list)  # calibration text files / folders / .jsonl (none: embedded)
    calib_windows: int = 16  # calibration windows
    calib_window: int = 512  # tokens per calibration window
    key_weighting: bool = True  # weigh key errors by query energy
    value_weighting: bool = True  # weigh value errors through W_O
    recover: str = field(  # layerwise fit after factorising, or none
        default="layerwise", metadata={"choices": RECOVER_MODES})
    fit_steps: int = 20  # layer-wise recovery steps per compressed layer
    fit_query_output: bool = field(  # the layer-wise fit also trains q/o (measured: much better), not only k/v and HLC
        default=True, metadata={"flag": "--fit-kv-only"})
    fit_mode: str = field(  # sequential: each layer on the student's own inputs (corrects the drift before it); teacher: on the teacher's inputs, alone
        default="sequential", metadata={"choices": FIT_MODES})
    evaluate: bool = field(default=True, metadata={"flag": "--no-eval"})  # report held-out perplexity
    evaluate_original: bool = field(  # also score the uncompressed model (skip when sweeping)
        default=True, metadata={"flag": "--skip-original-eval"})
    eval_windows: int = 8  # held-out perplexity windows
    eval_window: int = 1024  # tokens per held-out window
    kv_bits: int | None = field(  # also store the KV cache as 8- or 4-bit codes with scales (mea_kv_bits)
        default=None, metadata={"choices": KV_BITS})
    stream: bool = False  # load, compress and write one decoder layer at a time (checkpoints larger than memory; needs --recover none)
    device: str | None = None  # where the model runs (default cuda when a GPU is visible, else cpu); the factorisation runs on the CPU in float64
    dtype: str = field(  # weights: auto (bf16 on GPUs and CPUs with native bf16, else fp32), fp32 or bf16
        default=precision.DEFAULT_DTYPE, metadata={"choices": precision.PRECISIONS})


def validate(opts: CompressOptions) -> None:
    """Everything checkable before loading a model."""
    if opts.method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {opts.method!r}")
    if (opts.virtual_heads is None) == (opts.kv_budget is None):
        raise ValueError("give exactly one of --virtual-heads N or --kv-budget F")
    if opts.kv_budget is not None and not 0 < opts.kv_budget <= 1:
        raise ValueError(f"--kv-budget must be in (0, 1], got {opts.kv_budget}")
    if opts.virtual_heads is not None and opts.virtual_heads < 1:
        raise ValueError(f"--virtual-heads must be >= 1, got {opts.virtual_heads}")
    if opts.preset not in LAYER_PRESETS:
        raise ValueError(f"--preset must be one of {', '.join(LAYER_PRESETS)}, got {opts.preset!r}")
    if opts.recover not in RECOVER_MODES:
        raise ValueError(f"--recover must be one of {', '.join(RECOVER_MODES)}, got {opts.recover!r}")
    if opts.kv_bits is not None and opts.kv_bits not in KV_BITS:
        raise ValueError(f"--kv-bits must be one of {KV_BITS}, got {opts.kv_bits}")
    if opts.method == "svd" and opts.calib:
        raise ValueError("--method svd is data-free; drop --calib or use --method whitened")
    if opts.allocate not in ALLOCATIONS:
        raise ValueError(f"--allocate must be one of {', '.join(ALLOCATIONS)}, got {opts.allocate!r}")
    if opts.probe_objective not in PROBE_OBJECTIVES:
        raise ValueError(f"--probe-objective must be one of {', '.join(PROBE_OBJECTIVES)}, got {opts.probe_objective!r}")
    if not 0 <= opts.probe_floor < 1:
        raise ValueError(f"--probe-floor must be in [0, 1), got {opts.probe_floor}")
    if (opts.sensitivity or opts.probe_objective != "text" or opts.probe_floor) and opts.allocate == "errors":
        raise ValueError("--sensitivity, --probe-objective and --probe-floor steer the probe's allocation; with "
                         "--allocate errors each layer's budget is split by its own error curves: drop them, or drop "
                         "--allocate errors")



def probe_progress_path(out: str | Path) -> Path:
    """Beside the output directory: the probe's measurements so far, until the output is written."""
    out = Path(out)
    return out.with_name(out.name + ".probe-progress.json")


def heads_plan(cfg, opts: CompressOptions) -> list[int]:
    """The plan of --virtual-heads: h' on the chosen layers, h elsewhere."""
    h, num_layers = cfg.num_key_value_heads, cfg.num_hidden_layers
    if opts.virtual_heads > h:
        raise ValueError(f"--virtual-heads {opts.virtual_heads} is larger than the model's h = {h} KV heads")
    layers = parse_layers(opts.layers, num_layers) if opts.layers else preset_layers(opts.preset, num_layers)
    return uniform_plan(num_layers, h, opts.virtual_heads, layers)


def make_plan(model, opts: CompressOptions, tokenizer, moments, keys, probe_state: dict | None = None) -> tuple:
    """(the per-layer plan, the probe's measurements when a probe ran, else None); `probe_state`: `probe_layers`'
    progress file and fingerprint (a killed probe resumes)."""
    cfg = model.config
    h, num_layers = cfg.num_key_value_heads, cfg.num_hidden_layers
    if opts.virtual_heads is not None:
        return heads_plan(cfg, opts), None
    latent = method_of(opts.method).value_mixing == "latent"
    curves = ([error_curves(layer.self_attn, moments[i], opts.method) for i, layer in enumerate(model.model.layers)]
              if opts.allocate == "errors" or (latent and not opts.sensitivity) else None)
    if opts.allocate == "errors":  # the same share of every layer, split between keys and values by error
        return width_plan(curves, h, cfg.head_dim, opts.kv_budget, value_latent=latent), None
    if opts.sensitivity:
        table = load_sensitivity(opts.sensitivity, num_layers, widths=latent)
        if not latent:
            return budget_plan(table["delta_loss"], num_layers, h, opts.kv_budget, opts.probe_floor), None
        return width_budget_plan(table["delta_loss"], table["splits"], h, cfg.head_dim, opts.kv_budget,
                                 value_latent=True, floor=opts.probe_floor), None
    log(f"measuring per-layer sensitivity (quick {opts.probe_objective} probe; `mea probe` writes a fuller one)...")
    probe = quick_probe_loss(tokenizer, opts.probe_objective)
    if not latent:
        sens = probe_layers(model, probe, moments, keys, levels=list(range(1, h)), method=opts.method, log=log,
                            **(probe_state or {}))
        return budget_plan(sens["delta_loss"], num_layers, h, opts.kv_budget, opts.probe_floor), sens
    splits = probe_width_splits(curves, h, cfg.head_dim, opts.kv_budget, value_latent=True)  # layers may differ
    widths = sorted({w for row in splits.values() for w in row}, reverse=True)
    sens = probe_layers(model, probe, moments, keys, levels=widths, method=opts.method, splits=splits, log=log,
                        **(probe_state or {}))
    return width_budget_plan(sens["delta_loss"], splits, h, cfg.head_dim, opts.kv_budget, value_latent=True,
                             floor=opts.probe_floor), sens


def calibration_set(tok, opts: CompressOptions):
    """The calibration windows (N, T): --calib files, else the embedded corpus."""
    if opts.calib:
        return token_windows(tok, read_texts(opts.calib), window=opts.calib_window, count=opts.calib_windows,
                             what="calibration text")
    return calibration_windows(tok, window=opts.calib_window, count=opts.calib_windows)


@dataclass
class Compressed:
    """What `compress_model` made: the student, its per-layer plan, the factorisation's and the layer-wise fit's
    reports, the calibration windows, and the probe's measurements when a probe chose the plan."""

    student: torch.nn.Module
    plan: list
    factor_report: list
    fit_report: list | None
    windows: torch.Tensor
    probe: dict | None = None


def compress_model(teacher, tok, opts: CompressOptions, probe_state: dict | None = None) -> Compressed:
    """The compression steps on a loaded MEA teacher: calibration, plan, factorisation and the optional
    layer-wise fit."""
    if teacher.config.use_qk_norm and method_of(opts.method).key_mixing != "head":
        raise ValueError(f"--method {opts.method} mixes keys per RoPE pair, which QK-norm's per-feature scale does not "
                         "commute with; for this model (QK-norm) use --method whitened or svd")
    windows = calibration_set(tok, opts)
    moments = keys = None
    weighted = method_of(opts.method).weighted
    if weighted or opts.recover == "layerwise" or opts.kv_budget is not None:
        log(f"calibrating on {windows.numel()} tokens ...")
        moments = input_moments(teacher, windows)
        keys = key_moments(teacher, windows) if weighted else None
    plan, probe = make_plan(teacher, opts, tok, moments, keys, probe_state)
    log(f"plan per layer: {plan}")
    student, factor_report = factor_model(teacher, plan, method=opts.method, moments=moments, key_moments=keys,
                                          key_weighting=opts.key_weighting, value_weighting=opts.value_weighting)
    fit_report = None
    if opts.recover == "layerwise":
        log("layer-wise recovery (fitting each compressed attention to the original's outputs) ...")
        fit_report = layerwise_fit(student, teacher, windows, steps=opts.fit_steps,
                                   train_query_output=opts.fit_query_output, mode=opts.fit_mode, log=log)
    return Compressed(student, plan, factor_report, fit_report, windows, probe)


# the compression report's perplexities: report key -> held-out domain (Hamlet, and modern text outside the plays)
EVAL_DOMAINS = {"perplexity": "shakespeare", "perplexity_modern": "modern"}


def heldout_windows(tok, opts: CompressOptions, domain: str = "shakespeare"):
    """A held-out text the compression report scores."""
    return token_windows(tok, heldout_text(domain), window=opts.eval_window, count=opts.eval_windows,
                         what=f"held-out {domain} text")


IN_MEMORY_COPIES = 3  # the in-memory path holds the source model, its MEA copy and the compressed student


def check_memory(src: str, dtype: torch.dtype, device: torch.device) -> None:
    """A checkpoint directory too large to compress in memory is an error naming --stream, not a process the
    operating system kills."""
    path = Path(src)
    if not path.is_dir() or not any(path.glob("*.safetensors")):
        return
    need = IN_MEMORY_COPIES * Shards(path).bytes(torch.tensor([], dtype=dtype).element_size())
    free = available_memory(torch.device("cpu"))  # loaded there first
    if device.type != "cpu":
        free = min(free, available_memory(device))
    if need > free:
        raise ValueError(f"compressing {src} in memory needs about {need / 2**30:.1f} GiB ({IN_MEMORY_COPIES} copies "
                         f"in {precision.name(dtype)}), {free / 2**30:.1f} GiB are available: add --stream "
                         "--recover none to compress one layer at a time")


def compress(src: str, out: str, opts: CompressOptions, *, overwrite: bool = False) -> dict:
    validate(opts)
    device, dtype = precision.placement(opts.device, opts.dtype)
    check_output_dir(out, overwrite=overwrite)
    if opts.stream:
        return compress_streaming(src, out, opts, device=device, dtype=dtype)
    check_memory(src, dtype, device)
    t_start = time.perf_counter()
    log(f"loading {src} ({precision.name(dtype)} on {device}) ...")
    source = load_source(src, dtype=dtype)
    source.model.to(device)
    teacher = to_mea(source.model).to(device)
    if source.tokenizer is None:
        raise ValueError(f"{src} has no tokenizer files; compression needs one for calibration text")
    tok = source.tokenizer
    progress = probe_progress_path(out)  # a killed compression's probe measurements, reused when it is rerun
    fingerprint = {"source": str(src), "dtype": precision.name(dtype), "calib": opts.calib,
                   "calib_windows": opts.calib_windows, "calib_window": opts.calib_window}
    made = compress_model(teacher, tok, opts, {"progress": progress, "fingerprint": fingerprint})
    student, plan, windows = made.student, made.plan, made.windows
    if opts.kv_bits is not None:
        set_kv_quant(student, opts.kv_bits)
    provenance = {
        "source": source.description, "method": opts.method, "plan": plan,
        "kv_fraction": student.config.kv_cache_bytes_per_token() / teacher.config.kv_cache_bytes_per_token(),
        "options": vars(opts), "calibration": opts.calib or "embedded corpus (mea.data.calibration_windows)",
        "calibration_tokens": windows.numel(), "command": " ".join(sys.argv),
        "placement": precision.describe(device, dtype),
    }
    extra = {"mea_provenance.json": {**provenance, "factor_report": made.factor_report,
                                     "layerwise_fit": made.fit_report}}
    if made.probe is not None:  # kept: `--sensitivity OUT/probe.json` allocates another budget without a probe pass
        extra[PROBE_FILE] = {**made.probe, "source": source.description, "placement": provenance["placement"]}
    save_atomic(student, out, tokenizer=tok, copy_from=source.path, overwrite=overwrite, extra_json=extra)
    progress.unlink(missing_ok=True)
    log(f"wrote {out}")
    report = {"out": out, **{k: provenance[k] for k in ("source", "method", "plan", "kv_fraction", "placement")}}
    report["generated"] = {  # the sample answer and the KV bytes per token held for it, in the placement's dtype
        "original": generate_and_measure(source.model, tok, SAMPLE_PROMPT),
        "compressed": generate_and_measure(student, tok, SAMPLE_PROMPT),
    }
    if opts.evaluate:
        for key, domain in EVAL_DOMAINS.items():
            held = heldout_windows(tok, opts, domain)
            log(f"perplexity on the held-out {domain} text ...")
            report[key] = {"compressed": perplexity(student, held)["ppl"], "tokens": held[:, 1:].numel()}
            if opts.evaluate_original:
                report[key]["original"] = perplexity(source.model, held)["ppl"]
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    return report


def compress_streaming(src: str, out: str, opts: CompressOptions, *, device, dtype) -> dict:
    """`mea compress --stream`: the checkpoint directory `src` compressed one decoder layer at a time into `out`
    (complete or absent: written beside it, then renamed)."""
    from transformers import AutoConfig

    from ..checkpoint import load_tokenizer
    from ..convert.hf_to_mea import mea_config_from

    check_streamable(opts)
    path = Path(src)
    if not (path / "config.json").is_file():
        raise ValueError(f"--stream reads a checkpoint directory (config.json and safetensors shards); {src} is not one")
    t_start = time.perf_counter()
    config = mea_config_from(AutoConfig.from_pretrained(path))
    tok = load_tokenizer(path, vocab_size=config.vocab_size)
    if tok is None:
        raise ValueError(f"{src} has no tokenizer files; compression needs one for calibration text")
    windows = calibration_set(tok, opts)
    plan = heads_plan(config, opts)
    log(f"streaming {src} one layer at a time ({precision.name(dtype)} on {device}); plan per layer: {plan}")
    with atomic_dir(out) as tmp:
        result = compress_streamed(path, tmp, opts, config, plan, device=device, dtype=dtype, windows=windows, log=log)
        copy_tokenizer_files(path, tmp)
        provenance = {"source": str(path), "method": opts.method, "plan": plan,
                      "kv_fraction": result["config"].kv_cache_bytes_per_token() / config.kv_cache_bytes_per_token(),
                      "options": vars(opts), "calibration": opts.calib or "embedded corpus (mea.data.calibration_windows)",
                      "calibration_tokens": windows.numel(), "command": " ".join(sys.argv),
                      "placement": precision.describe(device, dtype), "streamed": True}
        finish(tmp, {**provenance, "factor_report": result["factor_report"], "layerwise_fit": None})
    log(f"wrote {out}")
    return {"out": out, **{k: provenance[k] for k in ("source", "method", "plan", "kv_fraction", "placement")},
            "streamed": True, "seconds": round(time.perf_counter() - t_start, 1)}
