"""The fused reads of a quantized cache: a small C++ extension (`csrc/key_scores.cpp`) that computes the key
logits q . K^T straight from per-channel key codes, the scale folded into the query once per group of tokens
and the zero point into one constant per group, codes widened in registers (no float buffer of keys); and the
value sums p @ V straight from the stored value planes, the per-token scale folded into the probabilities and
the zero point into one constant per row (no float buffer of values). One build holds both.

Built with torch's extension loader (`torch.utils.cpp_extension.load`: a C++ compiler and ninja) the first
time it is asked for, `-O3 -march=native` for the machine it runs on, into torch's extension directory
(`TORCH_EXTENSIONS_DIR`, default `~/.cache/torch_extensions`) under a name that includes a fingerprint of the
CPU's feature flags, so a directory shared by different machines never hands one a binary for another. Later
processes load the cached build. `load` tries once per process; where the build fails it returns None and
logs one line, and decoding uses the other reads (`ops.attention.quantized_key_read` and
`quantized_value_read` decide).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
from functools import lru_cache
from pathlib import Path

import torch

from ..precision import cpu_flags

SOURCE = Path(__file__).parent / "csrc" / "key_scores.cpp"
CFLAGS = ("-O3", "-march=native", "-fopenmp")  # OpenMP: torch's at::parallel_for splits work over its threads

log = logging.getLogger(__name__)


def extension_name() -> str:
    """The extension's module name: fixed prefix, then a fingerprint of this CPU's architecture and flags."""
    fingerprint = " ".join([platform.machine(), *sorted(cpu_flags())])
    return "mea_key_scores_" + hashlib.sha1(fingerprint.encode()).hexdigest()[:10]


def _find_ninja() -> None:
    """torch's loader runs `ninja` from PATH; a virtual environment used without activating it has the `ninja`
    package's binary off PATH, so its directory is appended."""
    if shutil.which("ninja") is None:
        import ninja

        os.environ["PATH"] = os.pathsep.join([os.environ.get("PATH", ""), ninja.BIN_DIR])


def build(*, cflags: tuple[str, ...] = CFLAGS, name: str | None = None):
    """Compile (or load the cached build of) the extension; raises where that fails. Other `cflags` (and a
    `name` of their own) build variants, e.g. for another instruction set."""
    from torch.utils.cpp_extension import load as load_extension

    _find_ninja()
    return load_extension(name=name or extension_name(), sources=[str(SOURCE)], extra_cflags=list(cflags),
                          extra_ldflags=["-fopenmp"], verbose=False)


@lru_cache(maxsize=1)
def load():
    """The compiled extension (built on first use, then cached on disk), or None where it cannot be built here."""
    try:
        return build()
    except Exception as err:  # noqa: BLE001 -- no compiler, no ninja, a failed build: the block read works anywhere
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        log.warning("mea: fused quantized-cache read unavailable (%s); keys are read in blocks, values by the other reads", first)
        return None


def key_scores(q: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scores: torch.Tensor,
               *, bits: int, group_size: int) -> None:
    """scores[..., :Q] = q (B, G, R, E) . the Q keys of codes (B, G, Q, E*bits/8) uint8 with float16 scales and
    zero points (B, G, Q/g, E); accumulated in float32 (q is read as float32). Needs `load()` to succeed."""
    load().key_scores(q.float().contiguous(), codes, scale, zero, scores, bits, group_size)


def value_sums(p: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, out: torch.Tensor,
               *, bits: int, group_size: int) -> None:
    """out (B, G, R, E) float32 += p (B, G, R, Q) @ the Q values held as planes (B, G, P, Q, W/2) uint8
    (`kvquant.to_planes`) with float16 scales and zero points (B, G, Q, E/group_size), `group_size` a multiple of
    the plane width W; accumulated in float32 (p is read as float32 or bfloat16). Needs `load()` to succeed."""
    if p.dtype not in (torch.float32, torch.bfloat16):
        p = p.float()
    if p.stride(-1) != 1:
        p = p.contiguous()
    load().value_sums(p, codes, scale, zero, out, bits, group_size)
