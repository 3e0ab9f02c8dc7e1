"""vLLM against `mea`, run in the environment of `make serve-env` (results as JSON under OUT):

    equality.json    greedy continuations from vLLM vs `mea`'s generate (run in the main environment by
                     `serving.reference`), token for token, and the largest log-probability difference
    capacity.json    vLLM's KV-cache capacity in tokens at one KV memory setting, per model (from the same
                     engines), and its ratio to the first model's
    throughput.json  offline generation of one fixed batch of long prompts, tokens/s, models side by side
                     (every round runs each model once, alternating; medians over rounds); with
                     --kv-memory-mib M, throughput-kvMmib.json: the same at M MiB of KV memory, where a
                     smaller cache lets vLLM run more of the batch's sequences at once

    python -m mea.serving.check OUT MODEL [MODEL ...] [--what equality capacity throughput]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..atomic import write_json_atomic

KV_CACHE_BYTES = 256 << 20  # the one KV memory setting every model gets (capacity compares tokens at it)
MAX_MODEL_LEN = 2048
LOGPROB_TOLERANCE = 1e-4  # fp32 on both sides; different kernels sum in different orders


def engine(model: str, **overrides):
    """A vLLM engine on a local checkpoint: fp32, token ids in and out (no tokenizer), eager (no compile)."""
    from vllm import LLM

    positions = json.loads((Path(model) / "config.json").read_text()).get("max_position_embeddings", MAX_MODEL_LEN)
    kwargs = dict(model=model, dtype="float32", skip_tokenizer_init=True, enforce_eager=True,
                  max_model_len=min(MAX_MODEL_LEN, positions), kv_cache_memory_bytes=KV_CACHE_BYTES, seed=0)
    return LLM(**{**kwargs, **overrides})


def kv_capacity_tokens(llm) -> int:
    """The KV-cache size in tokens vLLM allocated (the "KV cache size: N tokens" of its log)."""
    cache = llm.llm_engine.vllm_config.cache_config
    return int(cache.num_gpu_blocks) * int(cache.block_size)


def vllm_greedy(llm, prompts: list[list[int]], new_tokens: int) -> list[dict]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens, logprobs=1,
                            detokenize=False, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    rows = []
    for out in outs:
        seq = out.outputs[0]
        rows.append({"tokens": list(seq.token_ids),
                     "logprobs": [step[t].logprob for t, step in zip(seq.token_ids, seq.logprobs)]})
    return rows


def _worst(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)


def compare(reference: list[dict], served: list[dict]) -> dict:
    """Token equality and the largest |log p| difference over the tokens both agree on up to the first
    mismatch (from there on the two sides score different tokens); with float64 log-probabilities in the
    reference, also each fp32 side's own error against them, and with the reference's uncached fp32 forward,
    how far `mea`'s cached and uncached fp32 paths differ from each other (the model's rounding floor)."""
    same, worst, first_mismatch = True, 0.0, []
    served_err = mea_err = floor = 0.0
    for ref, got in zip(reference, served):
        n = next((i for i, (a, b) in enumerate(zip(ref["tokens"], got["tokens"])) if a != b), len(ref["tokens"]))
        same &= n == len(ref["tokens"]) == len(got["tokens"])
        first_mismatch.append(None if n == len(ref["tokens"]) else n)
        worst = max(worst, _worst(ref["logprobs"][:n], got["logprobs"][:n]))
        if "logprobs_float64" in ref:
            served_err = max(served_err, _worst(ref["logprobs_float64"][:n], got["logprobs"][:n]))
            mea_err = max(mea_err, _worst(ref["logprobs_float64"][:n], ref["logprobs"][:n]))
        if "logprobs_fp32_uncached" in ref:
            floor = max(floor, _worst(ref["logprobs_fp32_uncached"][:n], ref["logprobs"][:n]))
    out = {"tokens_equal": same, "first_mismatch": first_mismatch, "max_abs_logprob_diff": worst,
           "logprob_tolerance": LOGPROB_TOLERANCE, "passed": same and worst <= LOGPROB_TOLERANCE}
    if all("logprobs_float64" in ref for ref in reference):
        out.update(vllm_vs_float64=served_err, mea_vs_float64=mea_err)
    if all("logprobs_fp32_uncached" in ref for ref in reference):
        out.update(mea_cached_vs_uncached=floor)
    return out


def reference_rows(model: str, python: str, new_tokens: int) -> dict:
    """`serving.reference` run by the main environment's interpreter (it needs transformers >= 5.24)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "reference.json"
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        proc = subprocess.run([python, "-m", "mea.serving.reference", model, str(out), "--new-tokens",
                               str(new_tokens)], env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"the reference run failed ({python}):\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def equality(models: list[str], python: str, new_tokens: int) -> dict:
    results = {}
    for model in models:
        ref = reference_rows(model, python, new_tokens)
        llm = engine(model)
        served = vllm_greedy(llm, [row["prompt"] for row in ref["rows"]], new_tokens)
        results[model] = {**compare(ref["rows"], served), "prompts": len(served), "new_tokens": new_tokens,
                          "kv_capacity_tokens": kv_capacity_tokens(llm)}
        del llm
    return results


def throughput(models: list[str], *, prompts: int, prompt_tokens: int, new_tokens: int, rounds: int,
               kv_cache_bytes: int = KV_CACHE_BYTES) -> dict:
    """Each model's engine stays up; every round times one `generate` of the same batch on each in turn."""
    from .reference import prompt_ids

    engines = {model: engine(model, kv_cache_memory_bytes=kv_cache_bytes, max_model_len=prompt_tokens + new_tokens)
               for model in models}
    vocab = min(llm.llm_engine.model_config.hf_config.vocab_size for llm in engines.values())
    batch = [p[:prompt_tokens] for p in prompt_ids(vocab, prompts, prompt_tokens + 3 * prompts)]
    for llm in engines.values():  # warm-up
        vllm_greedy(llm, batch[:1], 2)
    seconds: dict[str, list[float]] = {model: [] for model in models}
    for _ in range(rounds):
        for model, llm in engines.items():
            start = time.perf_counter()
            vllm_greedy(llm, batch, new_tokens)
            seconds[model].append(time.perf_counter() - start)
    generated = prompts * new_tokens
    return {model: {"seconds": s, "median_seconds": statistics.median(s),
                    "generated_tokens_per_s": generated / statistics.median(s),
                    "kv_capacity_tokens": kv_capacity_tokens(engines[model])}
            for model, s in seconds.items()} | {"_batch": {"prompts": prompts, "prompt_tokens": prompt_tokens,
                                                           "new_tokens": new_tokens, "rounds": rounds}}


def header(kv_cache_bytes: int = KV_CACHE_BYTES) -> dict:
    import platform

    import torch
    import transformers
    import vllm

    return {"vllm": vllm.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cores": os.cpu_count(), "load_average": os.getloadavg(),
            "dtype": "float32", "kv_cache_bytes": kv_cache_bytes, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("models", nargs="+")
    ap.add_argument("--what", nargs="+", choices=("equality", "throughput"), default=["equality", "throughput"],
                    help="equality also writes capacity.json")
    ap.add_argument("--reference-python", default=str(Path(".venv/bin/python")),
                    help="the main environment's interpreter (runs mea's generate for the equality check)")
    ap.add_argument("--new-tokens", type=int, default=16, help="equality: greedy tokens per prompt")
    ap.add_argument("--batch", type=int, default=8, help="throughput: prompts in the batch")
    ap.add_argument("--prompt-tokens", type=int, default=512, help="throughput: tokens per prompt")
    ap.add_argument("--generate", type=int, default=32, help="throughput: new tokens per prompt")
    ap.add_argument("--rounds", type=int, default=3, help="throughput: timed rounds per model")
    ap.add_argument("--kv-memory-mib", type=int, help="throughput: KV memory per engine in MiB (default "
                    f"{KV_CACHE_BYTES >> 20}); small enough, it bounds how many sequences run at once")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if "equality" in args.what:
        res = equality(args.models, args.reference_python, args.new_tokens)
        write_json_atomic(out / "equality.json", {"header": header(), "models": res})
        base = res[args.models[0]]["kv_capacity_tokens"]
        write_json_atomic(out / "capacity.json", {"header": header(), "models": {
            model: {"kv_capacity_tokens": r["kv_capacity_tokens"], "vs_first": r["kv_capacity_tokens"] / base}
            for model, r in res.items()}})
        print(json.dumps(res, indent=2))
        if not all(r["passed"] for r in res.values()):
            sys.exit("vLLM and mea disagree (equality.json)")
    if "throughput" in args.what:
        kv_bytes = KV_CACHE_BYTES if args.kv_memory_mib is None else args.kv_memory_mib << 20
        res = throughput(args.models, prompts=args.batch, prompt_tokens=args.prompt_tokens,
                         new_tokens=args.generate, rounds=args.rounds, kv_cache_bytes=kv_bytes)
        name = "throughput.json" if args.kv_memory_mib is None else f"throughput-kv{args.kv_memory_mib}mib.json"
        write_json_atomic(out / name, {"header": header(kv_bytes), "models": res})


if __name__ == "__main__":
    main()
