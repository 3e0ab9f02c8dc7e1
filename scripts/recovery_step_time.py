"""CPU time of one recovery step (teacher forward, student forward + backward, KL) in float32 and under bf16
autocast, on this machine; with the CPU capability that `--precision auto` decides from.

    python scripts/recovery_step_time.py COMPRESSED OUT.json [--seq-len 1024] [--steps 2]
"""

from __future__ import annotations

import argparse
import tempfile

from mea import precision
from mea.atomic import write_json_atomic
from mea.bench.machine import machine_header
from mea.checkpoint import load_causal_lm
from mea.compress.recover import DistillConfig, distill
from mea.convert import load_source, to_mea
from mea.data import domain_documents


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("compressed")
    p.add_argument("out")
    p.add_argument("--teacher", default="smollm2")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args()
    source = load_source(args.teacher, tokenizer_for="recovery text")
    teacher = to_mea(source.model)
    text = "\n\n".join(t for _, t in domain_documents("modern", "calibration"))[: 40 * args.seq_len * args.steps]
    stream = source.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    rows = []
    for name in ("fp32", "bf16"):
        cfg = DistillConfig(tokens=args.steps * args.seq_len, seq_len=args.seq_len, batch=1, retrieval_frac=0.0,
                            precision=name, save_every=10 ** 6, warmup_steps=1)
        with tempfile.TemporaryDirectory() as tmp:
            res = distill(load_causal_lm(args.compressed), teacher, stream, tmp, cfg, log=print)
        rows.append({k: res[k] for k in ("precision", "seconds_per_step", "cpu_seconds_per_step", "steps")})
        print(rows[-1], flush=True)
    write_json_atomic(args.out, {"machine": machine_header(teacher.device), "auto": precision.name(
        precision.auto_dtype("cpu")), "seq_len": args.seq_len, "batch": 1, "compressed": args.compressed,
        "rows": rows})


if __name__ == "__main__":
    main()
