"""The KV bytes a system's cache holds after a real `generate()` has grown it token by token (prefill of
a prompt, then one token per step: the model's own attention layers decide what is stored), against the
bytes its configuration predicts. Our models get an empty `MEACache` (no preallocation: it grows in blocks
of `GROWTH_BLOCK` tokens); transformers' Llama its usual `DynamicCache`."""

from __future__ import annotations

import torch

from ..cache import GROWTH_BLOCK, MEACache, cache_bytes_held, cache_bytes_used
from ..markdown import markdown_table
from ..models import MEAForCausalLM
from .systems import predicted_kv_bytes

PROMPT, NEW_TOKENS = 64, GROWTH_BLOCK  # the cache grows past its first block while generating


@torch.no_grad()
def generated_kv(model, *, batch: int = 2, prompt: int = PROMPT, new_tokens: int = NEW_TOKENS) -> dict:
    """Generate `new_tokens` greedily after a random `prompt` (batch rows), then compare: the bytes of the
    stored tokens (must equal the prediction), and the bytes held (the allocation: at most one growth
    block of tokens more)."""
    dev = next(model.parameters()).device
    ids = torch.randint(1, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0))
    ids = ids.to(dev)
    extra = {"cache": MEACache(model.config.num_hidden_layers)} if isinstance(model, MEAForCausalLM) else {}
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True, pad_token_id=0,
                         **extra)
    cache = out.cache
    tokens = cache.get_seq_length()  # prompt + new_tokens - 1: the last token is never fed back
    held = cache_bytes_held(cache)
    used = cache_bytes_used(cache)
    predicted = predicted_kv_bytes(model, batch, tokens)
    return dict(batch=batch, tokens=tokens, kv_bytes_used=used, kv_bytes_held=held, kv_bytes_predicted=predicted,
                used_error=used / predicted - 1, held_error=held / predicted - 1)


def check_systems(systems: dict, **kwargs) -> list[dict]:
    """`generated_kv` for every system (name -> model)."""
    return [{"system": name, **generated_kv(model, **kwargs)} for name, model in systems.items()]


def markdown(checks: list[dict]) -> str:
    rows = [[c["system"], c["batch"], c["tokens"], f"{c['kv_bytes_used'] / 2**10:.1f}",
             f"{c['kv_bytes_predicted'] / 2**10:.1f}", f"{c['used_error']:+.2%}", f"{c['kv_bytes_held'] / 2**10:.1f}",
             f"{c['held_error']:+.2%}"] for c in checks]
    return ("KV bytes after `generate()` grew the cache (prefill, then one token per step):\n\n"
            + markdown_table(["system", "batch", "tokens", "KiB stored", "KiB predicted", "stored vs predicted",
                              "KiB held", "held vs predicted"], rows)
            + f"\nHeld: the allocation, which grows in blocks of {GROWTH_BLOCK} tokens for our cache.\n")
