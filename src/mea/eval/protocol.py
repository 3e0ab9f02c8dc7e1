"""The answer-from-the-cache protocol shared by every frontier measure.

A `CacheSystem` says how a model stores its context: which cache object to create and what to wrap
around the prefill (a kvpress press prunes the cache there). `prefill` runs the context through the
model once, with the cache, so the cache holds what the system keeps; `CachedContext.read` then feeds
more tokens (a question, an answer prefix, a chunk of text) through that stored cache, at their true
positions. Nothing after the prefill ever sees a full-precision copy of the context: a quantized or
pruned cache answers from what it actually keeps.

`kv_bytes` is measured on the cache object right after the prefill: the bytes of every tensor it
holds (quantized codes, scales and zero points included), divided by the context tokens.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..cache import cache_bytes_used


@dataclass
class CacheSystem:
    """How a model caches its context. `new_cache(model)`: a fresh cache object (None: the model's own
    default, a DynamicCache or an MEACache); `during_prefill(model, tokens)`: a context manager around the
    prefill forward of `tokens` context tokens (e.g. a kvpress press)."""

    name: str = "default"
    new_cache: Callable | None = None
    during_prefill: Callable = field(default=lambda model, tokens: contextlib.nullcontext())

    def make_cache(self, model):
        if self.new_cache is not None:
            return self.new_cache(model)
        if _is_mea(model):
            from ..cache import MEACache

            return MEACache(model.config.num_hidden_layers)
        from transformers import DynamicCache

        return DynamicCache()


def _is_mea(model) -> bool:
    return getattr(model.config, "model_type", None) == "mea"


class CachedContext:
    """A context stored in a cache; `read` feeds further tokens through it and returns their logits."""

    def __init__(self, model, cache, position: int):
        self.model, self.cache, self.position = model, cache, position
        self.kv_bytes = cache_bytes_used(cache)
        self.kv_bytes_per_token = self.kv_bytes / max(position, 1)

    @torch.no_grad()
    def read(self, ids: torch.Tensor) -> torch.Tensor:
        """(T,) token ids at the next T positions -> (T, V) float logits, each predicting the next token."""
        logits = _forward(self.model, ids, self.cache, self.position)
        self.position += ids.numel()
        return logits


def _forward(model, ids: torch.Tensor, cache, start: int, keep: int = 0) -> torch.Tensor:
    device = next(model.parameters()).device
    ids = ids.reshape(1, -1).to(device)
    positions = torch.arange(start, start + ids.shape[1], device=device)[None]
    kw = {_cache_argument(model): cache}
    out = model(input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=keep, **kw)
    return out.logits[0].float()


def _cache_argument(model) -> str:
    """`cache` for MEA models and recent transformers, `past_key_values` for older ones (kvpress's)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def prefill(model, system: CacheSystem, context: torch.Tensor) -> CachedContext:
    """One forward of `context` (T,) into a fresh cache of `system`; its logits are discarded."""
    if context.numel() < 1:
        raise ValueError("the context to prefill is empty; give at least one token")
    model.eval()
    cache = system.make_cache(model)
    with system.during_prefill(model, context.numel()):
        _forward(model, context, cache, 0, keep=1)
    return CachedContext(model, cache, context.numel())


@torch.no_grad()
def answer_from_cache(model, system: CacheSystem, context: torch.Tensor, question: torch.Tensor,
                      answer: torch.Tensor) -> dict:
    """Prefill `context`, then read `question` and the answer from the stored cache (teacher-forced in one
    forward). `found`: every answer token is the greedy (argmax) prediction, i.e. exactly what greedy
    decoding would print; `logprob`: mean log-probability of the answer tokens."""
    if question.numel() < 1 or answer.numel() < 1:
        raise ValueError("question and answer need at least one token each")
    state = prefill(model, system, context)
    logits = state.read(torch.cat([question, answer[:-1]]))[question.numel() - 1 :]  # (A, V)
    target = answer.to(logits.device)
    return {"found": bool((logits.argmax(-1) == target).all()),
            "logprob": torch.log_softmax(logits, -1).gather(-1, target[:, None]).mean().item(),
            "kv_bytes_per_token": state.kv_bytes_per_token}


@torch.no_grad()
def greedy_from_cache(model, system: CacheSystem, prompt: torch.Tensor, *, max_new_tokens: int,
                      stop: set[int] = frozenset()) -> list[int]:
    """Greedy decoding: all prompt tokens but the last are prefilled; the last is read from the cache, then
    each generated token in turn."""
    if prompt.numel() < 2:
        raise ValueError("the prompt needs at least two tokens (one to prefill, one to read)")
    state = prefill(model, system, prompt[:-1])
    token, out = prompt[-1:], []
    for _ in range(max_new_tokens):
        token = state.read(token)[-1].argmax()[None].cpu()
        if token.item() in stop:
            break
        out.append(token.item())
    return out
