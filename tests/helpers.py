"""Shared test helpers: tiny configs and padded batches."""

import torch

import mea


def tiny_config(**overrides) -> mea.MEAConfig:
    return mea.make_config("tiny", **{"vocab_size": 97, **overrides})


def randomize_mea(model: mea.MEAForCausalLM, *, scale: float = 0.3) -> mea.MEAForCausalLM:
    """Move norms and HLC away from their identity inits so tests cannot pass by accident."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(scale * torch.randn_like(p))
            elif ".hlc_" in name:
                p.add_(scale * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
    return model


def left_padded_batch(vocab: int, lengths=(7, 4, 2), total: int | None = None):
    total = total or max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), total))
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, total - n :] = 1
        ids[row, : total - n] = 0
    return ids, mask


def incremental_logits(model, ids, mask, prefill: int):
    """Prefill `prefill` tokens, then feed the rest one token at a time through the cache."""
    out = model(ids[:, :prefill], attention_mask=mask[:, :prefill], use_cache=True)
    logits, cache = [out.logits], out.cache
    for t in range(prefill, ids.shape[1]):
        out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache, use_cache=True)
        logits.append(out.logits)
        cache = out.cache
    return torch.cat(logits, dim=1), cache


class ByteTokenizer:
    """UTF-8 bytes as token ids: enough of the tokenizer interface for the text-window helpers."""

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=torch.tensor([list(text.encode("utf-8"))]))


def byte_tokenizer() -> ByteTokenizer:
    return ByteTokenizer()
