"""Peak resident memory of `mea compress --stream` on a checkpoint, against the model's fp32 size.

    python scripts/measure_streaming.py CHECKPOINT OUT_JSON [mea compress flags ...]

Runs the compression in a child process (its peak RSS is the kernel's ru_maxrss of the children) and writes
OUT_JSON with the machine header, the command, the peak and the ratio to 4 bytes x parameters.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mea.atomic import write_json_atomic
from mea.compress.streaming import Shards
from mea.machine import machine_header


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    src, out_json, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
    fp32_bytes = Shards(src).bytes(4)
    with tempfile.TemporaryDirectory(dir=Path(out_json).parent) as tmp:
        command = [sys.executable, "-m", "mea", "compress", src, str(Path(tmp) / "compressed"), "--stream", *flags]
        t0 = time.perf_counter()
        run = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if run.returncode:
            sys.exit(f"compression failed ({run.returncode}):\n{run.stderr[-3000:]}")
        out_bytes = sum(f.stat().st_size for f in (Path(tmp) / "compressed").glob("*.safetensors"))
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kilobytes on Linux
    result = {"machine": machine_header(torch.device("cpu")), "checkpoint": src,
              "command": " ".join(["mea", *command[3:4], "SRC", "OUT", *command[6:]]),
              "fp32_bytes": fp32_bytes, "peak_rss_bytes": peak, "peak_rss_over_fp32": round(peak / fp32_bytes, 4),
              "output_bytes": out_bytes, "seconds": round(seconds, 1), "report": json.loads(run.stdout)}
    write_json_atomic(out_json, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "report")}, indent=2))


if __name__ == "__main__":
    main()
