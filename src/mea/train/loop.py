"""The pretraining loop behind `mea train`.

    RUN/run.json          resolved training + model config, data files, environment (versions, commit, machine)
    RUN/metrics.jsonl     one JSON object per logged step ({"step", "loss", "lr", ...}) or evaluation ({"val_loss"})
    RUN/status.json       {"state": "running" | "paused" | "finished" | "diverged", "step", "reason", ...}
                      ("paused": stopped at `until`, continued by a later --resume)
    RUN/tokenizer/        the tokenizer the data was made with
    RUN/checkpoints/      the latest complete checkpoint (see `state.py`)
    RUN/model/            the final model, loadable with AutoModelForCausalLM (after `import mea`)

Batch k is a function of (seed, k) only, so `--resume` continues the exact loss sequence of an
uninterrupted run. Under torchrun each process takes its rows of the same global batch (DDP averages
the gradients), so the loss curve equals the single-process one up to float summation order.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import precision
from ..atomic import disk_full_as_value_error, write_json_atomic, write_text_atomic
from ..checkpoint import save_atomic
from ..machine import machine_header
from ..models import MEAForCausalLM
from ..models.configuration_mea import MEASURED
from ..models.head_norm_init import measure_head_norm_init
from .config import TrainConfig
from .data import prepare_data, train_batch, val_windows
from .distributed import Dist, barrier, full_state, load_full_state, mean_over_processes, setup, teardown, wrap
from .optim import make_optimizer
from .state import check_architecture, latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint


def train(cfg: TrainConfig | None, run: str | Path, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True, until: int | None = None) -> dict:
    """Train (or, with `resume`, continue) the run in directory `run`. With `resume` and no `cfg`, the run's
    saved config is used. With `until`, stop after that step (checkpointed, state "paused"): a later resume
    continues it exactly as if it had not stopped. Returns the final status."""
    if until is not None and until < 1:
        raise ValueError(f"--until must be a step >= 1, got {until}")
    d = setup()
    try:
        return _train(cfg, Path(run), d, resume=resume, overwrite=overwrite, progress=progress, until=until)
    finally:
        teardown(d)


def _train(cfg, run: Path, d: Dist, *, resume: bool, overwrite: bool, progress: bool, until: int | None) -> dict:
    cfg = _resolve_run_dir(cfg, run, d, resume=resume, overwrite=overwrite)
    mcfg = cfg.model_config()

    def load_data():
        return prepare_data(cfg.data, vocab_size=mcfg.vocab_size, tokenizer_dir=cfg.tokenizer,
                            val_fraction=cfg.val_fraction)

    if d.main:  # build the token cache once; the other processes read it
        data = load_data()
    barrier(d)
    if not d.main:
        data = load_data()
    mcfg.eos_token_id = mcfg.bos_token_id = data.tokenizer.eos_token_id
    val = val_windows(data.val, seq_len=cfg.seq_len, count=cfg.eval_windows, spread=cfg.eval_spread)

    torch.manual_seed(cfg.seed)
    model = MEAForCausalLM(mcfg).to(d.device)
    model.config.use_cache = False
    measured = None
    if mcfg.mea_head_norm_init == MEASURED:  # from the first batch, alike on every process and run again on resume
        first, _ = train_batch(data.train, seed=cfg.seed, step=0, rows=cfg.batch_size, seq_len=cfg.seq_len)
        measured = measure_head_norm_init(model, first.to(d.device))
    model = wrap(model, d, fsdp=cfg.fsdp)
    opt, sched = make_optimizer(model, cfg)
    forward = torch.compile(model) if cfg.compile else model
    dtype = precision.resolve(cfg.precision, d.device)
    autocast = ((lambda: torch.autocast(d.device.type, dtype=dtype)) if dtype != torch.float32
                else contextlib.nullcontext)

    start, ema, best_ema = 0, None, math.inf
    ckpt = latest_checkpoint(run) if resume else None
    if ckpt is not None:
        model_state, ts = load_checkpoint(ckpt)
        check_architecture(model_state, getattr(model, "module", model).state_dict(), ckpt)
        load_full_state(model, opt, model_state, ts["optimizer"])
        sched.load_state_dict(ts["scheduler"])
        start, ema, best_ema = ts["step"], ts["ema"], ts["best_ema"]
        torch.set_rng_state(ts["rng"])
    metrics = _Metrics(run / "metrics.jsonl", d.main, keep_until=start)
    if d.main:
        prune_checkpoints(run)  # what a killed save or deletion left behind
        if ckpt is None:
            data.tokenizer.save_pretrained(run / "tokenizer")
        write_json_atomic(run / "run.json", {
            "config": cfg.to_dict(), "model_config": mcfg.to_dict(),
            "data": {"cache": str(data.cache_dir), "train_tokens": int(data.train.size),
                     "val_tokens": int(data.val.size), "val_windows": int(val.shape[0])},
            "environment": {**machine_header(d.device), **precision.describe(d.device, dtype), "world_size": d.world,
                            "compile": cfg.compile, "parallel": "fsdp2" if cfg.fsdp and d.world > 1 else
                            ("ddp" if d.world > 1 else "single")},
            "resumed_from_step": start or None,
            **({"head_norm_measured_init": measured} if measured is not None else {})})
        _status(run, "running", start)

    rows = cfg.batch_size // d.world
    micro = rows // cfg.grad_accum
    mine = slice(d.rank * rows, (d.rank + 1) * rows)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    bar = _progress_bar(progress and d.main, start, cfg.steps)
    t_last, step_last = time.perf_counter(), start
    state, reason = "finished", None
    eval_steps = set(cfg.eval_steps)
    stop = cfg.steps if until is None else min(until, cfg.steps)
    for step in range(start, stop):
        x, y = train_batch(data.train, seed=cfg.seed, step=step, rows=cfg.batch_size, seq_len=cfg.seq_len,
                           row_slice=mine)
        loss_sum = torch.zeros((), device=d.device)
        for i in range(cfg.grad_accum):
            xb, yb = x[i * micro:(i + 1) * micro].to(d.device), y[i * micro:(i + 1) * micro].to(d.device)
            last = i == cfg.grad_accum - 1
            sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                with autocast():
                    logits = forward(input_ids=xb).logits
                loss = F.cross_entropy(logits.float().flatten(0, 1), yb.flatten()) / cfg.grad_accum
                loss.backward()
            loss_sum += loss.detach()
        loss_value = mean_over_processes(loss_sum, d).item()
        grad_norm = _clip(model, cfg.grad_clip)
        reason = _divergence(loss_value, grad_norm, ema, best_ema, cfg.divergence_delta)
        if reason:
            state = "diverged"
            opt.zero_grad(set_to_none=True)
            break
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema = loss_value if ema is None else 0.9 * ema + 0.1 * loss_value
        best_ema = min(best_ema, ema)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            now = time.perf_counter()
            tok_s = (done - step_last) * tokens_per_step / max(now - t_last, 1e-9)
            t_last, step_last = now, done
            metrics.write({"step": done, "tokens": done * tokens_per_step, "loss": loss_value, "loss_ema": ema,
                           "lr": sched.get_last_lr()[0], "grad_norm": grad_norm, "tokens_per_s": tok_s})
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{sched.get_last_lr()[0]:.2e}", tok_s=f"{tok_s:,.0f}")
        if done % cfg.eval_every == 0 or done == cfg.steps or done in eval_steps:
            metrics.write({"step": done, "tokens": done * tokens_per_step, "val_loss": evaluate(
                forward, val, micro=max(micro, 1), device=d.device, autocast=autocast)})
        if done % cfg.save_every == 0 or done == cfg.steps or done == stop:
            model_state, optim_state = full_state(model, opt)
            if d.main:
                save_checkpoint(run, done, model_state, {
                    "step": done, "optimizer": optim_state, "scheduler": sched.state_dict(), "ema": ema,
                    "best_ema": best_ema, "rng": torch.get_rng_state()})
            barrier(d)
        bar.update(1)
    bar.close()

    at = step + 1 if stop > start else start
    if state == "finished" and at < cfg.steps:
        state = "paused"
    result = {"state": state, "step": at - 1 if state == "diverged" else at, "reason": reason,
              "final_val_loss": metrics.last("val_loss"), "run": str(run)}
    if state == "finished":
        model_state, _ = full_state(model, opt)
        if d.main:
            final = MEAForCausalLM(mcfg)
            final.load_state_dict(model_state)
            final.config.use_cache = True
            save_atomic(final, run / "model", tokenizer=data.tokenizer, overwrite=True)
    elif state == "diverged" and d.main:
        metrics.write({"step": at, "diverged": reason})
    if d.main:
        last = latest_checkpoint(run)
        _status(run, state, result["step"], reason=reason, final_val_loss=result["final_val_loss"],
                last_checkpoint=str(last) if last else None)
    barrier(d)
    return result


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, *, micro: int, device, autocast) -> float:
    """Mean next-token loss over the fixed validation windows."""
    model.eval()
    total = 0.0
    for i in range(0, windows.shape[0], micro):
        w = windows[i:i + micro].to(device)
        with autocast():
            logits = model(input_ids=w[:, :-1]).logits
        total += F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
    model.train()
    return total / (windows.shape[0] * (windows.shape[1] - 1))


def _clip(model, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else math.inf)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2 returns a DTensor
    return float(norm)


def _divergence(loss: float, grad_norm: float, ema, best_ema: float, delta: float) -> str | None:
    if not math.isfinite(loss):
        return f"loss is {loss}"
    if not math.isfinite(grad_norm):
        return f"gradient norm is {grad_norm}"
    if ema is not None:
        new_ema = 0.9 * ema + 0.1 * loss
        if new_ema - best_ema > delta:
            return f"loss spike: moving average {new_ema:.3f} is {new_ema - best_ema:.3f} nats above its best {best_ema:.3f}"
    return None


def _resolve_run_dir(cfg: TrainConfig | None, run: Path, d: Dist, *, resume: bool, overwrite: bool) -> TrainConfig:
    if cfg is not None:  # bad options fail before anything on disk is touched
        _check(cfg, d)
    saved_path = run / "run.json"
    if resume:
        if not saved_path.is_file():
            if cfg is None:
                raise ValueError(f"nothing to resume in {run} (no run.json); start it without --resume")
        else:
            saved = TrainConfig.from_dict(json.loads(saved_path.read_text())["config"])
            if cfg is not None and cfg.to_dict() != saved.to_dict():
                diff = sorted(k for k, v in cfg.to_dict().items() if saved.to_dict()[k] != v)
                raise ValueError(f"--resume with options that differ from the run's saved config: {diff}; "
                                 f"drop them to continue {run} as it was started")
            cfg = saved
    elif run.exists() and any(run.iterdir()):
        if not overwrite:
            raise ValueError(f"{run} already holds a run; pass --resume to continue it or --overwrite to start again")
        barrier(d)  # every process has looked before the directory goes
        if d.main:
            shutil.rmtree(run)
    _check(cfg, d)
    if d.main:
        run.mkdir(parents=True, exist_ok=True)
    barrier(d)
    return cfg


def _check(cfg: TrainConfig, d: Dist) -> None:
    cfg.check()
    if cfg.batch_size % (d.world * cfg.grad_accum):
        raise ValueError(f"batch_size ({cfg.batch_size}) must divide into {d.world} processes x grad_accum "
                         f"({cfg.grad_accum}) equal micro-batches; pick a multiple of {d.world * cfg.grad_accum}")


def _status(run: Path, state: str, step: int, **extra) -> None:
    write_json_atomic(run / "status.json", {"state": state, "step": step, **extra,
                                            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


class _Metrics:
    """metrics.jsonl, appended line by line (main process only). On resume, lines past the checkpoint are
    dropped first (and a line cut short by a kill or a full disk), so the file reads like the uninterrupted
    run's."""

    def __init__(self, path: Path, active: bool, *, keep_until: int):
        self.path, self.active, self.records = path, active, []
        if path.is_file():
            self.records = [r for r in map(_json_or_none, path.read_text().splitlines())
                            if r is not None and r["step"] <= keep_until]
            if active:
                write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in self.records))
        elif active:
            path.touch()

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self.active:
            with disk_full_as_value_error(self.path), open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def last(self, key: str):
        return next((r[key] for r in reversed(self.records) if key in r), None)


def _json_or_none(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def _progress_bar(enabled: bool, start: int, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True)
