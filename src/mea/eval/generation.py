"""Generate from a model and measure the KV-cache bytes its cache actually holds."""

from __future__ import annotations

import torch


def cache_bytes(cache) -> int:
    """Bytes of the cached tokens in a Hugging Face cache object: an MEACache's stored tokens, else every
    tensor its layers hold (keys/values; for a QuantizedCache the packed codes, scales and zero points
    and the full-precision residual; for a pruned kvpress cache the kept tokens)."""
    if hasattr(cache, "bytes_used"):
        return cache.bytes_used()
    seen: set[int] = set()
    return sum(_tensor_bytes(v, seen) for layer in getattr(cache, "layers", []) for v in vars(layer).values())


def _tensor_bytes(obj, seen: set[int]) -> int:
    """Bytes of the tensors in `obj` (tensors, tensor subclasses such as quanto's QTensor, and lists, tuples
    and dicts of them); a storage counted once."""
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):  # e.g. quanto's packed codes
            names, _ = obj.__tensor_flatten__()
            return sum(_tensor_bytes(getattr(obj, n), seen) for n in names)
        if obj.numel() == 0:
            return 0
        key = obj.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(x, seen) for x in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(x, seen) for x in obj.values())
    return 0


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
    used, tokens = cache_bytes(out.cache), out.cache.get_seq_length()
    held = out.cache.bytes_held() if hasattr(out.cache, "bytes_held") else used
    return {"prompt": prompt, "text": tokenizer.decode(new, skip_special_tokens=True), "cache_tokens": tokens,
            "cache_bytes_held": held, "kv_bytes_per_token": used / max(tokens, 1)}
