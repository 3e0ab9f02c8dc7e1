"""Needle in a haystack: plant a sentence with a random number at a chosen depth of a long stretch of
text (the embedded corpus, or any token stream such as modern held-out text), then ask for the number
at the end. Each trial follows the cache protocol (`protocol.answer_from_cache`): the haystack is
prefilled into the cache of the chosen `CacheSystem`, then the question and answer are read from that
stored cache in one forward. The model retrieves the needle when every token of the answer is its
greedy (argmax) prediction, which is exactly what greedy generation would print. The mean
log-probability of the answer is kept as a finer score for models that fail outright.

Trials vary the number and the stretch of text (seeded); cells are (context length, needle depth).
"""

from __future__ import annotations

import random

import torch

from ..data import embedded_documents
from ..plotting import pyplot, save_figure
from .protocol import CacheSystem, answer_from_cache

NEEDLE = "\nThe secret number of the magician is {number}.\n"
QUESTION = "\n\nQuestion: what is the secret number of the magician?\nAnswer: The secret number of the magician is"


def haystack_ids(tokenizer, min_tokens: int = 50_000) -> torch.Tensor:
    """Plays of the embedded corpus (in name order) as one token stream of at least `min_tokens`."""
    ids: list[int] = []
    for _, text in embedded_documents():
        ids += tokenizer(text + "\n\n", add_special_tokens=False).input_ids
        if len(ids) >= min_tokens:
            break
    return torch.tensor(ids)


def build_prompt(tokenizer, hay: torch.Tensor, *, length: int, depth: float, number: str, offset: int):
    """(context ids, question ids, answer ids), `length` tokens in all, the needle after `depth` of the filler."""
    needle = tokenizer(NEEDLE.format(number=number), add_special_tokens=False).input_ids
    question = tokenizer(QUESTION, add_special_tokens=False).input_ids
    answer = tokenizer(" " + number, add_special_tokens=False).input_ids
    filler = length - len(needle) - len(question) - len(answer)
    if filler < 16:
        raise ValueError(f"context length {length} is too short for the needle and question; use >= {length - filler + 16}")
    if offset + filler > hay.numel():
        raise ValueError(f"the haystack has {hay.numel()} tokens, fewer than a {length}-token context needs")
    text = hay[offset : offset + filler].tolist()
    cut = round(depth * filler)
    return torch.tensor(text[:cut] + needle + text[cut:]), torch.tensor(question), torch.tensor(answer)


def needle_grid(model, tokenizer, *, lengths: list[int], depths: list[float], trials: int = 3, seed: int = 0,
                log=None, system: CacheSystem | None = None, hay: torch.Tensor | None = None) -> dict:
    """Retrieval accuracy and mean answer log-probability for every (length, depth) cell. `system`: how the
    context is cached (default: the model's own cache); `hay`: the filler token stream (default: the
    embedded corpus)."""
    max_len = getattr(model.config, "max_position_embeddings", None)
    if max_len and max(lengths) > max_len:
        raise ValueError(f"context length {max(lengths)} exceeds the model's max_position_embeddings {max_len}")
    if not all(0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"needle depths must be in [0, 1], got {depths}")
    if hay is None:
        hay = haystack_ids(tokenizer, min_tokens=max(50_000, 4 * max(lengths)))
    system = system or CacheSystem()
    rng = random.Random(seed)
    model.eval()
    cells = []
    for length in lengths:
        for depth in depths:
            found, logp = [], []
            for _ in range(trials):
                number = str(rng.randrange(10_000, 100_000))
                offset = rng.randrange(0, max(1, hay.numel() - length))
                r = answer_from_cache(model, system, *build_prompt(tokenizer, hay, length=length, depth=depth,
                                                                   number=number, offset=offset))
                found.append(r["found"])
                logp.append(r["logprob"])
            cells.append({"length": length, "depth": depth, "accuracy": sum(found) / trials,
                          "answer_logprob": sum(logp) / trials, "trials": trials})
            if log:
                log(f"needle length {length} depth {depth:.2f}: {sum(found)}/{trials}")
    return {"lengths": lengths, "depths": depths, "trials": trials, "seed": seed, "cells": cells}


def plot_heatmap(result: dict, path, title: str = "") -> None:
    plt = pyplot()
    import numpy as np

    lengths, depths = result["lengths"], result["depths"]
    grid = np.zeros((len(depths), len(lengths)))
    for c in result["cells"]:
        grid[depths.index(c["depth"]), lengths.index(c["length"])] = c["accuracy"]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.6 * len(depths) + 1.6))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    for i in range(len(depths)):
        for j in range(len(lengths)):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title or f"needle retrieval ({result['trials']} trials per cell)", fontsize=9)
    fig.colorbar(im, ax=ax, label="retrieved")
    save_figure(fig, path, dpi=120)
