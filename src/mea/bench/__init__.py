"""Speed and memory benchmarks (`mea bench ...`); results are JSON with a machine header."""

from .decode import bench_decode
from .train_step import bench_train

__all__ = ["bench_decode", "bench_train"]
