"""Where do vLLM and `mea` part in fp32? Each layer's attention output (the input of o_proj, every query head
after W_lc^V) for one prompt's prefill and two decode steps, from vLLM (the plugin) and from `mea` in fp32,
each as a relative error against `mea` in float64. A layer whose vLLM error stood out from the others, or
from the original model's, would point at a mapping bug; errors at fp32 rounding level everywhere say the
log-probability differences of `serving.check` are accumulated rounding.

Run from the serve environment (it starts the main environment's interpreter for the `mea` side):

    .venv-serve/bin/python scripts/serving_layer_error.py OUT.json MODEL [MODEL ...]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPT_TOKENS, DECODE_STEPS = 24, 2


def vllm_side(model: str) -> dict:
    """Every layer's o_proj input from vLLM: prefill of the prompt, then DECODE_STEPS single-token steps."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the model lives in this process, so hooks see it
    from mea.serving.check import engine, vllm_greedy
    from mea.serving.reference import prompt_ids

    store: dict[int, list[torch.Tensor]] = {}

    def install(net):
        for i, layer in enumerate(net.model.layers):
            layer.self_attn.o_proj.register_forward_pre_hook(
                lambda mod, args, i=i: store.setdefault(i, []).append(args[0].detach().double().clone()))

    llm = engine(model)
    llm.apply_model(install)
    prompt = prompt_ids(llm.llm_engine.model_config.hf_config.vocab_size, 1, PROMPT_TOKENS)[0]
    tokens = vllm_greedy(llm, [prompt], DECODE_STEPS + 1)[0]["tokens"]
    return {"prompt": prompt, "tokens": tokens, "attn": {i: torch.cat(v) for i, v in store.items()}}


def mea_side(model: str, ids: list[int]) -> dict:
    """Every layer's o_proj input from one uncached forward of `mea`, in fp32 and float64."""
    from mea.checkpoint import load_causal_lm

    out = {}
    for name, dtype in (("fp32", torch.float32), ("float64", torch.float64)):
        net = load_causal_lm(model, dtype=dtype).eval()
        st = {}
        for i, layer in enumerate(net.model.layers):
            layer.self_attn.o_proj.register_forward_pre_hook(lambda mod, a, i=i: st.__setitem__(i, a[0][0].double()))
        with torch.no_grad():
            net(torch.tensor([ids]))
        out[name] = st
    return out


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def compare(model: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        served = vllm_side(model)
        ids = served["prompt"] + served["tokens"][:DECODE_STEPS]
        path = Path(tmp) / "mea.pt"
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        subprocess.run([str(ROOT / ".venv/bin/python"), __file__, "--mea-side", model, json.dumps(ids), str(path)],
                       env=env, check=True)
        ref = torch.load(path, weights_only=True)
    p = PROMPT_TOKENS
    layers = []
    for i, v in sorted(served["attn"].items()):
        exact, fp32 = ref["float64"][i], ref["fp32"][i]
        layers.append({"layer": i, "vllm_prefill": relative(v[:p], exact[:p]), "vllm_decode": relative(v[p:], exact[p:]),
                       "mea_prefill": relative(fp32[:p], exact[:p]), "mea_decode": relative(fp32[p:], exact[p:])})
    worst = {k: max(row[k] for row in layers) for k in layers[0] if k != "layer"}
    ratio = max(row["vllm_prefill"] / row["mea_prefill"] for row in layers)
    return {"layers": layers, "worst": worst, "largest_vllm_over_mea_prefill": ratio}


def main(argv: list[str]) -> None:
    if argv[:1] == ["--mea-side"]:
        model, ids, path = argv[1], json.loads(argv[2]), argv[3]
        torch.save(mea_side(model, ids), path)
        return
    if len(argv) < 2:
        sys.exit(__doc__)
    from mea.atomic import write_json_atomic
    from mea.serving.check import header

    out, models = argv[0], argv[1:]
    write_json_atomic(out, {"header": header(), "prompt_tokens": PROMPT_TOKENS, "decode_steps": DECODE_STEPS,
                            "models": {m: compare(m) for m in models}})
    print(json.dumps({m: r["worst"] for m, r in json.load(open(out))["models"].items()}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
