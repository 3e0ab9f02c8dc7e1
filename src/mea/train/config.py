"""`TrainConfig`: everything a pretraining run needs, as one flat dataclass (a JSON or TOML file holds the
same keys; command-line flags override it). Defaults follow the paper's recipe (AdamW, weight decay 0.1,
linear warmup, cosine decay to 10% of the peak) at laptop scale."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..precision import PRECISIONS
from ..models.presets import PRESETS, VARIANTS, make_config


@dataclass
class TrainConfig:
    # model: a named preset and variant plus config-field overrides (e.g. {"num_hidden_layers": 4})
    preset: str = field(default="small", metadata={"choices": tuple(PRESETS)})  # model size
    variant: str = field(default="mea", metadata={"choices": tuple(VARIANTS)})  # attention variant
    model: dict = field(default_factory=dict)
    # data: text files / folders / JSONL (empty: the embedded Shakespeare corpus); a tokenizer directory
    # (None: train a byte-level BPE with the model's vocab size on the training split)
    data: list = field(default_factory=list)  # text files / folders / .jsonl / domain:modern, domain:shakespeare (none: the embedded corpus)
    tokenizer: str | None = None  # a tokenizer directory (none: a byte-level BPE trained on the training split)
    val_fraction: float = 0.05  # the tail of every document, fixed for the corpus
    # batch: `batch_size` sequences of `seq_len` tokens per optimizer step, over all processes and
    # `grad_accum` micro-steps
    seq_len: int = 256  # tokens per sequence
    batch_size: int = 16  # sequences per optimizer step, over all processes and micro-steps
    grad_accum: int = 1  # micro-steps per optimizer step
    steps: int = 1000  # optimizer steps
    # optimizer and schedule
    lr: float = 1e-3  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # cosine decay ends at 10% of the peak, as in the paper
    warmup_steps: int = 100  # linear warm-up steps
    weight_decay: float = 0.1  # AdamW weight decay
    decay_all: bool = False  # also decay norms, biases, embeddings and HLC/lambda vectors (off in the paper)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    seed: int = 0
    # execution: "auto" = bf16 autocast where the hardware has native bf16 (mea.precision), fp32 elsewhere
    precision: str = "auto"
    compile: bool = False
    fsdp: bool = False  # under torchrun: FSDP2 (fully_shard per block) instead of DDP
    # bookkeeping
    log_every: int = 10  # steps between metrics lines
    eval_every: int = 100  # steps between validation losses
    eval_steps: list[int] = field(default_factory=list)  # further steps to evaluate at (e.g. log-spaced)
    eval_windows: int = 64  # validation windows of seq_len tokens (fixed; the same every evaluation)
    eval_spread: bool = False  # validation windows spread over the whole validation split (off: from its start)
    save_every: int = 200  # steps between checkpoints
    # divergence is a result: stop when the loss is not finite, or when its moving average rises more than
    # `divergence_delta` nats above the lowest it has been
    divergence_delta: float = 1.0

    def check(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "log_every", "eval_every", "eval_windows",
                     "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if any(not isinstance(s, int) or s < 1 for s in self.eval_steps):
            raise ValueError(f"eval_steps must be positive step numbers, got {self.eval_steps}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise ValueError(f"need lr > 0, 0 <= min_lr_ratio <= 1, warmup_steps >= 0 "
                             f"(got {self.lr}, {self.min_lr_ratio}, {self.warmup_steps})")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})")
        self.model_config()  # unknown or invalid model overrides fail here, before any work

    def model_config(self):
        return make_config(self.preset, self.variant, **self.model)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


def load_config_file(path: str | Path) -> dict:
    """Options from a .json or .toml file (the TrainConfig keys; `model` is a table of config fields)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {p} does not exist")
    try:
        if p.suffix == ".toml":
            try:
                import tomllib
            except ImportError as e:  # Python 3.10
                raise ValueError(f"{p}: TOML config files need Python 3.11+; use a .json file") from e
            return tomllib.loads(p.read_text())
        return json.loads(p.read_text())
    except ValueError as e:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise ValueError(f"could not parse {p}: {e}") from e
