"""`mea demo`: build small MEA models (h' = h and h' = 1), teach them a toy sequence task, generate
through the component-head cache, and report the KV bytes the cache really held."""

from __future__ import annotations

import time

import torch

from .models import MEAForCausalLM, make_config


def progression_batch(batch: int, length: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Rows x_t = (a + t * step) mod vocab, a task that needs attention over the context (the step)."""
    start = torch.randint(0, vocab, (batch, 1), generator=generator)
    step = torch.randint(1, 8, (batch, 1), generator=generator)
    return (start + step * torch.arange(length)) % vocab


def run_demo(*, preset: str = "tiny", new_tokens: int = 32, context: int = 48, steps: int = 150,
             seed: int = 0) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    report = {}
    for m in (None, 1):
        cfg = make_config(preset, "mea", mea_num_component_heads=m)
        model = MEAForCausalLM(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
        t0 = time.perf_counter()
        for _ in range(steps):
            ids = progression_batch(16, 96, cfg.vocab_size, gen)
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        train_s = time.perf_counter() - t0
        model.eval()
        prompt = progression_batch(4, context, cfg.vocab_size, torch.Generator().manual_seed(seed + 1))
        full = progression_batch(4, context + new_tokens, cfg.vocab_size, torch.Generator().manual_seed(seed + 1))
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True,
                                 pad_token_id=0)
        new = out.sequences[:, context:]
        report[f"h'={cfg.component_heads()[0]} of h={cfg.num_key_value_heads}"] = {
            "final_train_loss": round(loss.item(), 4),
            "train_seconds": round(train_s, 1),
            "generated_token_accuracy": (new == full[:, context:]).float().mean().item(),
            "kv_cache_bytes_held": out.cache.bytes_held(),
            "kv_cache_tokens": out.cache.get_seq_length(),
            "kv_bytes_per_token_fp32": out.cache.bytes_held() // out.cache.get_seq_length(),
            "sample_row": new[0, :12].tolist(),
        }
    names = list(report)
    report["cache_ratio"] = report[names[1]]["kv_cache_bytes_held"] / report[names[0]]["kv_cache_bytes_held"]
    return report
