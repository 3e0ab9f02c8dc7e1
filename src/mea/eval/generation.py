"""Generate from a model and measure the KV-cache bytes its cache actually holds."""

from __future__ import annotations

import torch

from ..cache import cache_bytes_held, cache_bytes_used


def chat_prompt(tokenizer, text: str) -> torch.Tensor:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(text, return_tensors="pt").input_ids
    return ids


@torch.no_grad()
def generate_and_measure(model, tokenizer, prompt: str, *, max_new_tokens: int = 40) -> dict:
    ids = chat_prompt(tokenizer, prompt).to(model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    new = out.sequences[0, ids.shape[1] :]
    used, tokens = cache_bytes_used(out.cache), out.cache.get_seq_length()
    held = cache_bytes_held(out.cache)
    return {"prompt": prompt, "text": tokenizer.decode(new, skip_special_tokens=True), "cache_tokens": tokens,
            "cache_bytes_held": held, "kv_bytes_per_token": used / max(tokens, 1)}
