"""Training-free comparison of the KV factorisation families on a model (default: the embedded SmolLM2):
per-layer key/value errors on held-out text and held-out perplexity at KV kept 2/3 and 1/2.
Writes OUT/<method>-kv<percent>.json, OUT/original.json, OUT/summary.json and OUT/table.md; resumable.

    PYTHONPATH=src python scripts/factorisation_table.py [--out results/factorisation] [--src smollm2]
"""

import argparse
import json
import sys

from mea.experiments.factorisation import KEPT, METHODS, run_factorisation_study

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--out", default="results/factorisation")
p.add_argument("--src", default="smollm2")
p.add_argument("--methods", nargs="+", default=list(METHODS))
p.add_argument("--kept", nargs="+", type=float, default=list(KEPT))
args = p.parse_args()
summary = run_factorisation_study(args.out, src=args.src, methods=args.methods, kept=args.kept,
                                  log=lambda m: print(m, file=sys.stderr, flush=True))
print(json.dumps(summary, indent=1))
