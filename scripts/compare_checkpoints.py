"""Two safetensors checkpoint directories tensor by tensor: the same names, dtypes and shapes, bit-identical or
not, and the largest absolute difference (with the tensor holding it). Reads one tensor of each at a time.

    python scripts/compare_checkpoints.py DIR_A DIR_B [OUT_JSON]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors import safe_open

from mea.atomic import write_json_atomic


def locations(directory: str) -> dict[str, Path]:
    names = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            names.update(dict.fromkeys(f.keys(), file))
    return names


def read(file: Path, name: str):
    with safe_open(file, "pt") as f:
        return f.get_tensor(name)


def main() -> None:
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    a, b = locations(sys.argv[1]), locations(sys.argv[2])
    if set(a) != set(b):
        sys.exit(f"different tensor names: {sorted(set(a) ^ set(b))[:10]}")
    identical, layout, worst = True, True, ("", 0.0)
    for name in sorted(a):
        x, y = read(a[name], name), read(b[name], name)
        layout &= x.dtype == y.dtype and x.shape == y.shape
        identical &= bool(layout and (x == y).all())
        diff = (x.double() - y.double()).abs().max().item() if x.shape == y.shape else float("inf")
        worst = max(worst, (name, diff), key=lambda t: t[1])
    result = {"a": sys.argv[1], "b": sys.argv[2], "tensors": len(a), "same_dtypes_and_shapes": layout,
              "identical": identical, "max_abs_diff": worst[1], "max_abs_diff_tensor": worst[0]}
    if len(sys.argv) == 4:
        write_json_atomic(Path(sys.argv[3]), result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
