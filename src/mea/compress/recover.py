"""Recovery of a compressed model.

* `layerwise_fit`: cheap, local. Layer by layer over calibration windows, fit each compressed
  attention (virtual-head projections, HLC, optionally q/o) so that the student's residual stream
  after it matches the teacher's (relative MSE, Adam). No backward through the model.
* `distill`: end-to-end. KL(teacher || student) on next-token distributions at every position (plus
  optional LM loss and per-layer attention-output matching) over long windows of a text stream mixed
  with synthetic retrieval sequences, optionally training only attention parameters. Checkpoints are
  written atomically and a run resumes exactly where it stopped; a token budget bounds it.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import precision
from ..atomic import atomic_dir
from ..checkpoint import load_torch_state, verify_checksums, write_checksums
from ..data import DEFAULT_DOMAIN, DOMAINS
from ..data.retrieval import retrieval_sequence
from ..models import MEAForCausalLM
from ..ops import rope_cos_sin
from ..train.distributed import barrier, full_state, mean_over_processes, setup, wrap

LAYOUT_FIELDS = ("fsdp", "activation_checkpointing")  # how a run is laid out: a run may resume under another


def _positions_cos_sin(model: MEAForCausalLM, batch: int, length: int, dtype):
    pos = torch.arange(length, device=model.device)[None].expand(batch, length)
    return rope_cos_sin(model.model.inv_freq, pos, model.model.rope_scaling, dtype)


def _fit_attention(attn, xs: torch.Tensor, targets: torch.Tensor, cos, sin, *, steps: int, lr: float, batch: int,
                   trained: set[str]) -> tuple[float, float]:
    """Adam on the relative squared error of attn(xs) against targets, (N, T, C) each; trains the named
    sub-modules / parameters of `attn` only. Returns the mean relative error before and after."""
    chunks = [slice(j, j + batch) for j in range(0, xs.shape[0], batch)]

    def rel_error(chunk):
        x, y = xs[chunk], targets[chunk]
        return (attn(x, cos[: len(x)], sin[: len(x)]) - y).pow(2).sum() / y.pow(2).sum()

    def mean_error():
        with torch.no_grad():
            return sum(rel_error(c).item() for c in chunks) / len(chunks)

    params = [p for name, p in attn.named_parameters() if name.split(".")[0] in trained]
    frozen = [p for name, p in attn.named_parameters() if name.split(".")[0] not in trained]
    for p in frozen:
        p.requires_grad_(False)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    before = mean_error()
    for step in range(steps):
        loss = rel_error(chunks[step % len(chunks)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    for p in frozen:
        p.requires_grad_(True)
    return before, mean_error()


def _trained_names(train_query_output: bool) -> set[str]:
    return {"k_proj", "v_proj", "hlc_k", "hlc_v"} | ({"q_proj", "o_proj"} if train_query_output else set())


@torch.no_grad()
def _batched(fn, x: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([fn(x[j : j + batch]) for j in range(0, x.shape[0], batch)])


FIT_MODES = ("sequential", "teacher")


def layerwise_fit(student: MEAForCausalLM, teacher: MEAForCausalLM, windows: torch.Tensor, *, steps: int = 20,
                  lr: float = 1e-3, batch: int = 4, train_query_output: bool = True, mode: str = "sequential",
                  log=print) -> list[dict]:
    """Layer-wise fit over the calibration `windows` (N, T); teacher and student hidden states are
    carried through the layers side by side.
    mode "sequential" (error-correcting): each compressed attention is trained on the student's own
    inputs to move the student's residual stream to the teacher's state after that attention
    (target = h_teacher + attn_teacher(...) - h_student), so it also absorbs upstream drift.
    mode "teacher" (teacher-forced): trained on the teacher's inputs to reproduce the teacher
    attention's output. Trains k/v projections and HLC (and q/o with train_query_output), in place.
    Returns per-layer relative errors before/after."""
    if mode not in FIT_MODES:
        raise ValueError(f"fit mode must be one of {', '.join(FIT_MODES)}, got {mode!r}")
    trained = _trained_names(train_query_output)
    n, t = windows.shape
    cos, sin = _positions_cos_sin(student, min(batch, n), t, student.dtype)

    def attend(attn, x):
        return attn(x, cos[: len(x)], sin[: len(x)])

    h_t = _batched(teacher.model.embed_tokens, windows.to(teacher.device), batch)
    h_s = h_t.clone()
    report = []
    for i, (s_block, t_block) in enumerate(zip(student.model.layers, teacher.model.layers)):
        x_t = _batched(t_block.input_layernorm, h_t, batch)
        mid_t = h_t + _batched(lambda x: attend(t_block.self_attn, x), x_t, batch)
        x_s = _batched(s_block.input_layernorm, h_s, batch)
        if s_block.self_attn.cache_layout != t_block.self_attn.cache_layout:
            x_in, target = (x_s, mid_t - h_s) if mode == "sequential" else (x_t, mid_t - h_t)
            before, after = _fit_attention(s_block.self_attn, x_in, target, cos, sin, steps=steps, lr=lr,
                                           batch=batch, trained=trained)
            report.append({"layer": i, "rel_error_before": before, "rel_error_after": after})
            log(f"layer {i:2d}: attention target rel. error {before:.4f} -> {after:.4f}")
        mid_s = h_s + _batched(lambda x: attend(s_block.self_attn, x), x_s, batch)
        h_s = mid_s + _batched(lambda x: s_block.mlp(s_block.post_attention_layernorm(x)), mid_s, batch)
        h_t = mid_t + _batched(lambda x: t_block.mlp(t_block.post_attention_layernorm(x)), mid_t, batch)
    return report


TRAIN_SETS = ("attention", "all")


@dataclass
class DistillConfig:
    tokens: int = 100_000  # token budget (student tokens seen)
    seq_len: int = 2048  # tokens per sequence: long, so that the student learns to use distant context
    batch: int = 1  # sequences per step
    lr: float = 1e-4  # peak learning rate (AdamW; linear warm-up, cosine decay to 10%)
    warmup_steps: int = 5  # linear warm-up steps
    train: str = field(  # attention: attention parameters only; all: every parameter
        default="attention", metadata={"choices": TRAIN_SETS})
    kl_weight: float = 1.0  # KL(teacher || student) on next-token distributions, at every position
    lm_weight: float = 0.0  # plus the language-model loss on the text
    attn_match_weight: float = 0.0  # plus the relative MSE of every layer's attention output against the teacher's
    retrieval_frac: float = 0.25  # share of sequences that are synthetic retrieval sequences (mea.data.retrieval)
    domain: str = field(  # text trained on when no --text files are given (mea.data.training_tokens)
        default=DEFAULT_DOMAIN, metadata={"choices": DOMAINS})
    save_every: int = 25  # steps between checkpoints
    seed: int = 0  # seed of the retrieval sequences
    precision: str = field(  # autocast dtype: auto (bf16 where the hardware computes it natively), fp32 or bf16
        default="auto", metadata={"choices": precision.PRECISIONS})
    fsdp: bool = False  # under torchrun: shard the student with FSDP2 instead of replicating it (DDP)
    activation_checkpointing: bool = False  # recompute each block in the backward pass: less memory, ~1/3 more compute

    def check(self) -> None:
        if self.tokens < 0:
            raise ValueError(f"--tokens must be >= 0, got {self.tokens}")
        for name in ("seq_len", "batch", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("kl_weight", "lm_weight", "attn_match_weight", "lr"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.retrieval_frac <= 1:
            raise ValueError(f"--retrieval-frac must be in [0, 1], got {self.retrieval_frac}")
        precision.resolve(self.precision, "cpu")  # an unknown name fails here
        if self.domain not in DOMAINS:
            raise ValueError(f"--domain must be one of {', '.join(DOMAINS)}, got {self.domain!r}")



def _trainable(model: MEAForCausalLM, which: str) -> list[torch.nn.Parameter]:
    if which not in TRAIN_SETS:
        raise ValueError(f"--train must be one of {', '.join(TRAIN_SETS)}, got {which!r}")
    named = list(model.named_parameters())
    chosen = [p for n, p in named if which == "all" or ".self_attn." in n]
    for n, p in named:
        p.requires_grad_(any(p is c for c in chosen))
    return chosen


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over every position of every sequence of KL(teacher || student)."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return F.kl_div(s.flatten(0, -2), t.flatten(0, -2), log_target=True, reduction="batchmean")


def attention_match_loss(student_outputs: list[torch.Tensor], teacher_outputs: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of the relative squared error of the student's attention output against the teacher's."""
    if len(student_outputs) != len(teacher_outputs) or not student_outputs:
        raise ValueError(f"attention matching needs one output per layer from each model, got "
                         f"{len(student_outputs)} and {len(teacher_outputs)}")
    return torch.stack([(s.float() - t.float()).pow(2).mean() / t.float().pow(2).mean().clamp_min(1e-12)
                        for s, t in zip(student_outputs, teacher_outputs)]).mean()


@contextlib.contextmanager
def attention_outputs(model: MEAForCausalLM, enabled: bool = True):
    """Collects the output of every layer's attention module during the forward passes inside the block."""
    outputs: list[torch.Tensor] = []
    handles = [layer.self_attn.register_forward_hook(lambda module, args, out: outputs.append(out))
               for layer in model.model.layers] if enabled else []
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


def is_retrieval_row(index: int, fraction: float) -> bool:
    """Row `index` of the run is a synthetic retrieval sequence: an even spread of `fraction` of the rows."""
    return math.floor((index + 1) * fraction) > math.floor(index * fraction)


def batch_at(step: int, stream: torch.Tensor, cfg: DistillConfig, tokenizer=None) -> torch.Tensor:
    """(batch, seq_len + 1) token ids of step `step`, a pure function of the step: plain rows are consecutive
    windows of `stream`; a `retrieval_frac` share are retrieval sequences planted in text of `stream`."""
    usable = stream.numel() - 1
    rows = []
    for b in range(cfg.batch):
        i = step * cfg.batch + b
        if is_retrieval_row(i, cfg.retrieval_frac):
            rows.append(retrieval_sequence(tokenizer, stream, length=cfg.seq_len + 1, seed=cfg.seed, index=i).ids)
        else:
            start = (i * cfg.seq_len) % (usable - cfg.seq_len)
            rows.append(stream[start : start + cfg.seq_len + 1])
    return torch.stack(rows)


def load_trained(student: MEAForCausalLM, state_dir: Path, cfg: DistillConfig) -> MEAForCausalLM:
    """`student` with the weights a recovery in `state_dir` trained (the whole model, however it was laid out)."""
    _trainable(student, cfg.train)
    _load_trainable(student, state_dir, fix=f"recover again into a new directory, or delete {state_dir}")
    for p in student.parameters():
        p.requires_grad_(True)
    return student.eval()


def _load_trainable(student: MEAForCausalLM, state_dir: Path, *, fix: str) -> None:
    """Loads the trainable weights saved in `state_dir`; every one of them must match a trainable parameter of
    `student` by name and shape, and every trainable parameter must be there. `fix`: what the error advises."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = state_dir / "student.safetensors"
    try:
        state = load_file(path)
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{path} is damaged or missing ({type(e).__name__}: {e}); {fix}") from e
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    try:
        missing, unexpected = student.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a name matches with another shape
        raise ValueError(f"{path} does not fit this model: {e}; resume with the same model, or {fix}") from e
    not_loaded = sorted(trainable & set(missing))
    if unexpected or not_loaded:
        raise ValueError(f"{path} does not fit this model: unexpected {sorted(unexpected)[:5]}, missing trained "
                         f"{not_loaded[:5]}; resume with the same model and --train, or {fix}")


def distill(student: MEAForCausalLM, teacher, stream: torch.Tensor, state_dir: str | Path, cfg: DistillConfig,
            *, tokenizer=None, log=print) -> dict:
    """Train `student` in place toward `teacher` over the batches `batch_at` cuts from the token `stream`
    (`tokenizer` makes the retrieval sequences). Progress lives in `state_dir` (student weights, optimizer,
    position), written atomically every `save_every` steps; calling again with the same `state_dir` resumes
    and stops at the budget."""
    from safetensors.torch import save_file

    cfg.check()
    if cfg.retrieval_frac and tokenizer is None:
        raise ValueError("retrieval sequences need the tokenizer: pass tokenizer=, or set retrieval_frac=0")
    d = setup()  # under torchrun: one process per device, each a share of every batch; alone: world 1
    if cfg.batch % d.world:
        raise ValueError(f"--batch {cfg.batch} (sequences per step, all processes together) must be a multiple of "
                         f"the {d.world} processes")
    state_dir = Path(state_dir)
    tokens_per_step = cfg.batch * cfg.seq_len
    total_steps = max(1, cfg.tokens // tokens_per_step)
    if stream.numel() < tokens_per_step + 1:
        raise ValueError(f"training text too short: {stream.numel()} tokens, one step needs {tokens_per_step + 1}")
    dtype = precision.resolve(cfg.precision, student.device)
    _trainable(student, cfg.train)
    trained = [n for n, p in student.named_parameters() if p.requires_grad]

    def lr_at(step):  # linear warm-up, cosine decay to 10%
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))

    progress_file = state_dir / "progress.json"
    progress = {"step": 0, "losses": [], "config": asdict(cfg)}
    optim_state = None
    if progress_file.exists():
        progress = json.loads(progress_file.read_text())
        if _settings(progress["config"]) != _settings(asdict(cfg)):
            raise ValueError(f"{state_dir} holds a run with other settings {progress['config']}; "
                             "use the same settings to resume, or another output directory")
        progress["config"] = asdict(cfg)
        fix = f"delete {state_dir} to start the recovery over"
        verify_checksums(state_dir, fix=fix)
        _load_trainable(student, state_dir, fix=fix)
        optim_state = load_torch_state(state_dir / "optimizer.pt", fix=fix)
        log(f"resuming at step {progress['step']}/{total_steps}")
    if cfg.activation_checkpointing:
        student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = wrap(student, d, fsdp=cfg.fsdp)  # FSDP2 swaps the parameters in place: the optimizer comes after
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    if optim_state is not None:
        _load_optimizer(model, opt, optim_state, state_dir, sharded=cfg.fsdp and d.world > 1)

    def save():  # weights, optimizer and position replace the previous ones together; unsharded, by name
        model_state, opt_state = full_state(model, opt)  # collective
        if d.main:
            with atomic_dir(state_dir) as tmp:
                save_file({n: model_state[n].contiguous() for n in trained}, tmp / "student.safetensors")
                with open(tmp / "optimizer.pt", "wb") as f:
                    torch.save(opt_state, f)
                (tmp / progress_file.name).write_text(json.dumps(progress, indent=2) + "\n")
                write_checksums(tmp)
        barrier(d)

    try:
        from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=progress["step"], desc="recover", unit="step") if d.main else None
    except ImportError:  # pragma: no cover
        bar = None
    student.train()
    teacher.eval()
    t0, cpu0, first_step = time.perf_counter(), time.process_time(), progress["step"]
    match = cfg.attn_match_weight > 0
    while progress["step"] < total_steps:
        step = progress["step"]
        ids = batch_at(step, stream, cfg, tokenizer).chunk(d.world)[d.rank].to(student.device)  # this process's rows
        x, y = ids[:, :-1], ids[:, 1:]
        with torch.autocast(student.device.type, dtype=dtype, enabled=dtype != torch.float32):
            with torch.no_grad(), attention_outputs(teacher, match) as t_attn:
                t_logits = teacher(input_ids=x, use_cache=False).logits
            with attention_outputs(student, match) as s_attn:
                s_logits = model(input_ids=x, use_cache=False).logits
        loss = cfg.kl_weight * kl_loss(s_logits, t_logits)
        if cfg.lm_weight:
            loss = loss + cfg.lm_weight * F.cross_entropy(s_logits.flatten(0, 1).float(), y.flatten())
        if match:
            loss = loss + cfg.attn_match_weight * attention_match_loss(s_attn, t_attn)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        progress["step"] = step + 1
        progress["losses"].append(round(mean_over_processes(loss.detach(), d).item(), 5))  # the whole batch's
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr_at(step):.1e}",
                            tok_s=f"{tokens_per_step * (bar.n - bar.initial) / (time.perf_counter() - t0):.0f}")
        if progress["step"] % cfg.save_every == 0 or progress["step"] == total_steps:
            save()
    if bar is not None:
        bar.close()
    student.eval()
    for p in student.parameters():
        p.requires_grad_(True)
    run_steps = progress["step"] - first_step
    return {"steps": progress["step"], "tokens": progress["step"] * tokens_per_step,
            "first_loss": progress["losses"][0] if progress["losses"] else None,
            "last_loss": progress["losses"][-1] if progress["losses"] else None, "losses": progress["losses"],
            "seconds_per_step": round((time.perf_counter() - t0) / run_steps, 3) if run_steps else None,
            # CPU time of this process (all threads) per step: comparable across machines under load
            "cpu_seconds_per_step": round((time.process_time() - cpu0) / run_steps, 3) if run_steps else None,
            "processes": d.world, "layout": ("fsdp2" if cfg.fsdp else "ddp") if d.world > 1 else "one process",
            **precision.describe(student.device, dtype)}


def _settings(config: dict) -> dict:
    """What must match to resume a run: every setting but the layout (defaults for fields added since)."""
    return {k: v for k, v in {**asdict(DistillConfig()), **config}.items() if k not in LAYOUT_FIELDS}


def _load_optimizer(model, opt: torch.optim.Optimizer, state: dict, state_dir: Path, *, sharded: bool) -> None:
    """The optimizer state saved by name (any process count or layout); a state saved by position (before
    runs could change layout) loads into one process or DDP only."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if all(isinstance(k, str) for k in state.get("state", {})):
        set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
    elif not sharded:
        opt.load_state_dict(state)
    else:
        raise ValueError(f"{state_dir} was saved by an older version for one process: resume it without --fsdp")
