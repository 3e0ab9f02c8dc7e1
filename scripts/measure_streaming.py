"""Peak resident memory of `mea compress --stream` on a checkpoint, against the model's fp32 size.

    python scripts/measure_streaming.py CHECKPOINT OUT_JSON [mea compress flags ...]

Runs the compression in a child process (its peak RSS is the kernel's ru_maxrss of that process, from wait4) and writes
OUT_JSON with the machine header, the command, the peak and the ratio to 4 bytes x parameters, and where the
peak happened: the child's resident memory sampled every 0.2 s beside the last line it had logged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from mea.atomic import write_json_atomic
from mea.compress.streaming import Shards
from mea.machine import machine_header


def sample_rss(child: subprocess.Popen, log: Path, t0: float, every: float = 0.2) -> list[dict]:
    """Until `child` exits: its resident memory every `every` seconds, kept when it changes by more than
    32 MiB, each with the last line of its log at that moment."""
    timeline, last = [], -1
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:  # exited: its own peak, not that of every child this process ever had
            child.returncode = os.waitstatus_to_exitcode(status)
            child.peak_rss = usage.ru_maxrss * 1024  # kilobytes on Linux
            break
        try:
            status = Path(f"/proc/{child.pid}/status").read_text()
        except OSError:  # exiting: reaped on the next pass
            status = ""
        rss = next((int(l.split()[1]) * 1024 for l in status.splitlines() if l.startswith("VmRSS:")), 0)
        if abs(rss - last) > 32 << 20:
            lines = [l for l in log.read_text(errors="replace").replace("\r", "\n").splitlines() if l.strip()]
            timeline.append({"seconds": round(time.perf_counter() - t0, 1), "rss_bytes": rss,
                             "last_log_line": lines[-1][:160] if lines else ""})
            last = rss
        time.sleep(every)
    return timeline


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    src, out_json, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
    fp32_bytes = Shards(src).bytes(4)
    with tempfile.TemporaryDirectory(dir=Path(out_json).parent) as tmp:
        command = [sys.executable, "-m", "mea", "compress", src, str(Path(tmp) / "compressed"), "--stream", *flags]
        t0 = time.perf_counter()
        with open(Path(tmp) / "stderr.log", "w+") as err:
            child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True)
            reader = threading.Thread(target=lambda: setattr(child, "captured", child.stdout.read()))
            reader.start()
            timeline = sample_rss(child, Path(tmp) / "stderr.log", t0)
            reader.join()
            err.seek(0)
            stderr = err.read()
        seconds = time.perf_counter() - t0
        if child.returncode:
            sys.exit(f"compression failed ({child.returncode}):\n{stderr[-3000:]}")
        out_bytes = sum(f.stat().st_size for f in (Path(tmp) / "compressed").glob("*.safetensors"))
    peak = child.peak_rss
    result = {"machine": machine_header(torch.device("cpu")), "checkpoint": src,
              "command": " ".join(["mea", *command[3:4], "SRC", "OUT", *command[6:]]),
              "fp32_bytes": fp32_bytes, "peak_rss_bytes": peak, "peak_rss_over_fp32": round(peak / fp32_bytes, 4),
              "output_bytes": out_bytes, "seconds": round(seconds, 1),
              "peak_sampled": max(timeline, key=lambda r: r["rss_bytes"], default=None), "timeline": timeline,
              "report": json.loads(child.captured)}
    write_json_atomic(out_json, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "report")}, indent=2))


if __name__ == "__main__":
    main()
