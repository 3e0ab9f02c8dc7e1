"""Pretraining: data, the loop, checkpoints, and data parallelism through torchrun (DDP / FSDP2)."""

from .config import TrainConfig, load_config_file
from .loop import evaluate, train

__all__ = ["TrainConfig", "evaluate", "load_config_file", "train"]
