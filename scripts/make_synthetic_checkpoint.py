"""A Llama checkpoint of a real model's shape with random weights, written shard by shard (never the whole model in
memory), with the embedded SmolLM2 tokenizer (its ids fit any larger vocabulary). For measuring what large
checkpoints cost without downloading one.

    python scripts/make_synthetic_checkpoint.py OUT [--shape llama3.2-1b] [--layers N] [--dtype bf16]
        [--layers-per-shard 4]

--layers keeps the shape's widths with fewer (or more) decoder layers: streamed compression's peak memory should
not depend on it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaConfig

SHAPES = {  # the published configs' shapes
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                        max_position_embeddings=131072, rms_norm_eps=1e-5,
                        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 8192}),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=16, vocab_size=50000, tie_word_embeddings=True,
                 max_position_embeddings=4096, rms_norm_eps=1e-5),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def layer_tensors(cfg: LlamaConfig, i: int, gen: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    c, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    shapes = {"self_attn.q_proj.weight": (cfg.num_attention_heads * d, c),
              "self_attn.k_proj.weight": (cfg.num_key_value_heads * d, c),
              "self_attn.v_proj.weight": (cfg.num_key_value_heads * d, c),
              "self_attn.o_proj.weight": (c, cfg.num_attention_heads * d),
              "mlp.gate_proj.weight": (f, c), "mlp.up_proj.weight": (f, c), "mlp.down_proj.weight": (c, f)}
    out = {f"model.layers.{i}.{name}": (torch.randn(shape, generator=gen) * 0.02).to(dtype)
           for name, shape in shapes.items()}
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[f"model.layers.{i}.{norm}.weight"] = torch.ones(c, dtype=dtype)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3.2-1b")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--layers", type=int, help="decoder layers (default: the shape's)")
    p.add_argument("--layers-per-shard", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="a folder of tokenizer files to copy in (default: the embedded SmolLM2's)")
    args = p.parse_args()
    out, dtype = Path(args.out), DTYPES[args.dtype]
    out.mkdir(parents=True, exist_ok=False)
    cfg = LlamaConfig(**{**SHAPES[args.shape], **({"num_hidden_layers": args.layers} if args.layers else {})},
                      bos_token_id=1, eos_token_id=2)
    cfg.dtype = dtype
    gen = torch.Generator().manual_seed(args.seed)
    weight_map, shard = {}, 0

    def write(tensors: dict) -> None:
        nonlocal shard
        shard += 1
        name = f"model-{shard:05d}.safetensors"
        save_file(tensors, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))

    write({"model.embed_tokens.weight": (torch.randn(cfg.vocab_size, cfg.hidden_size, generator=gen) * 0.02).to(dtype),
           "model.norm.weight": torch.ones(cfg.hidden_size, dtype=dtype)})
    for first in range(0, cfg.num_hidden_layers, args.layers_per_shard):
        tensors = {}
        for i in range(first, min(first + args.layers_per_shard, cfg.num_hidden_layers)):
            tensors.update(layer_tensors(cfg, i, gen, dtype))
        write(tensors)
    total = sum((out / f).stat().st_size for f in set(weight_map.values()))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    cfg.save_pretrained(out)
    if args.tokenizer:  # e.g. where the embedded model's package is not installed (a GPU machine)
        AutoTokenizer.from_pretrained(args.tokenizer).save_pretrained(out)
    else:
        from mea.convert.sources import embedded_gguf

        gguf = embedded_gguf()
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    params = sum(torch.Size(s).numel() for s in _shapes(out))
    print(json.dumps({"out": str(out), "shape": args.shape, "parameters": params, "bytes_on_disk": total,
                      "fp32_bytes": 4 * params}))


def _shapes(path: Path):
    from safetensors import safe_open

    for f in sorted(path.glob("model-*.safetensors")):
        with safe_open(f, "pt") as h:
            yield from (h.get_slice(n).get_shape() for n in h.keys())


if __name__ == "__main__":
    main()
