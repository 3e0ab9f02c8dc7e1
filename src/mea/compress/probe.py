"""The paper's layer-sensitivity probe: compress one layer at a time and measure the loss, either the
next-token loss on text or the loss of planted answers that must be retrieved from far back in the context
(a layer can matter little for the next token and much for retrieval)."""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..atomic import write_json_atomic
from ..data import probe_windows
from ..data.retrieval import retrieval_sequence
from ..eval import perplexity
from .factor_model import factor_attention

PROBE_OBJECTIVES = ("text", "retrieval", "both")
PROBE_SEED = 7919  # retrieval sequences of the probe: a stream of their own, not the recovery's (seed 0, 1, ...)


@dataclass
class ProbeLoss:
    """What the probe compares: `loss(model)` in nats per scored token, over `tokens` scored tokens."""

    objective: str
    loss: Callable
    tokens: int


def answer_loss(model, sequences) -> float:
    """Mean NLL of the planted answers' tokens (`RetrievalSequence.answers`) given everything before them."""
    device = next(model.parameters()).device
    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for seq in sequences:
            logits = model(input_ids=seq.ids[None].to(device), use_cache=False).logits[0].float()
            for start, end in seq.answers:
                target = seq.ids[start:end].to(device)
                nll += torch.nn.functional.cross_entropy(logits[start - 1 : end - 1], target, reduction="sum").item()
                count += end - start
    return nll / count


def probe_loss(tokenizer, objective: str = "text", *, windows: int = 4, window: int = 512) -> ProbeLoss:
    """text: next-token loss on `windows` probe windows; retrieval: the answers' loss in as many synthetic
    retrieval sequences of `window` tokens built from the same probe text (never the held-out text); both: the
    sum of the two (a layer's cost is then its text and its retrieval damage together)."""
    if objective not in PROBE_OBJECTIVES:
        raise ValueError(f"unknown probe objective {objective!r}; choose one of {', '.join(PROBE_OBJECTIVES)}")
    texts = probe_windows(tokenizer, window=window, count=windows)

    def text_loss(model) -> float:
        return perplexity(model, texts)["nll"]

    if objective == "text":
        return ProbeLoss(objective, text_loss, texts[:, 1:].numel())
    stream = texts.flatten()
    sequences = [retrieval_sequence(tokenizer, stream, length=window, seed=PROBE_SEED, index=i) for i in range(windows)]
    answers = sum(end - start for seq in sequences for start, end in seq.answers)
    if objective == "retrieval":
        return ProbeLoss(objective, lambda model: answer_loss(model, sequences), answers)
    return ProbeLoss(objective, lambda model: text_loss(model) + answer_loss(model, sequences),
                     texts[:, 1:].numel() + answers)


def quick_probe_loss(tokenizer, objective: str = "text") -> ProbeLoss:
    """The small probe `mea compress --kv-budget` runs when given no probe.json: retrieval needs sequences long
    enough to ask across a distance (two facts per 1024 tokens)."""
    windows, window = (2, 256) if objective == "text" else (4, 1024)
    return probe_loss(tokenizer, objective, windows=windows, window=window)


class LayerInputs:
    """Every decoder layer's input on the probe's sequences, recorded in one uncompressed pass. Compressing
    layer L changes nothing before it, so the pass that measures layer L replays its recorded input and runs
    only layers L.. (the same numbers, about half the layers on average)."""

    def __init__(self):
        self.inputs: dict[tuple, list[torch.Tensor]] = {}  # sequence batch -> [input of layer 0, 1, ...]

    @staticmethod
    def key(ids: torch.Tensor) -> tuple:
        return tuple(ids.shape), ids.cpu().numpy().tobytes()

    @contextlib.contextmanager
    def recording(self, model):
        base, current = model.model, []

        def on_embed(module, args, output):
            current[:] = [self.key(args[0])]
            self.inputs[current[0]] = []

        def on_layer(module, args):
            self.inputs[current[0]].append(args[0].detach())

        hooks = [base.embed_tokens.register_forward_hook(on_embed)]
        hooks += [layer.register_forward_pre_hook(on_layer) for layer in base.layers]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()

    @contextlib.contextmanager
    def starting_at(self, model, layer: int):
        """The model runs from `layer` on, its input the recorded one for the same token ids."""
        base = model.model
        embed, layers = base.embed_tokens, base.layers
        base.embed_tokens = _Replay(self, layer)
        base.layers = torch.nn.ModuleList(list(layers)[layer:])
        try:
            yield
        finally:
            base.embed_tokens, base.layers = embed, layers


class _Replay(torch.nn.Module):
    def __init__(self, recorded: LayerInputs, layer: int):
        super().__init__()
        self.recorded, self.layer = recorded, layer

    def forward(self, input_ids):
        inputs = self.recorded.inputs.get(LayerInputs.key(input_ids))
        if inputs is None:
            raise ValueError("the probe's loss read sequences its uncompressed pass did not: a probe loss must read "
                             "the same sequences on every call")
        return inputs[self.layer]


BASE_LOSS_TOLERANCE = 1e-4  # nats: a progress file whose uncompressed loss differs by more is another model or probe


def load_progress(path: Path | None, fingerprint: dict, base: float, log=print) -> dict:
    """The measurements a killed probe left in `path` ({layer: {level: (target, delta)}}), when they were taken
    with the same `fingerprint` and the same uncompressed loss; else none."""
    if path is None or not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    if saved.get("fingerprint") != fingerprint or not math.isclose(saved.get("base_loss", math.nan), base,
                                                                    abs_tol=BASE_LOSS_TOLERANCE):
        log(f"{path} holds another probe's measurements (other model, options or data): starting afresh")
        return {}
    done = {int(layer): {int(m): tuple(v) for m, v in row.items()} for layer, row in saved["delta_loss"].items()}
    log(f"resuming the probe from {path}: {sum(map(len, done.values()))} measurements kept")
    return done


def probe_layers(model, probe: ProbeLoss, moments, key_moments=None, *, levels: list[int],
                 method: str = "whitened", splits: dict[int, dict[int, tuple[int, int]]] | None = None,
                 progress: Path | None = None, fingerprint: dict | None = None, log=print) -> dict:
    """delta_loss[layer][level] = the probe's loss with only that layer compressed, minus the uncompressed loss
    (nats per token). A level is h' virtual heads, or with `splits` a cached width in floats per token, the layer
    then compressed to splits[layer][width] = (h'_K, value size) (`plan.probe_width_splits`; widths a layer
    cannot take are skipped). moments / key_moments: from `calibrate` (see `factor_model`). `progress`: a file
    the measurements are written to after every layer, from which a killed probe resumes (a measurement is kept
    only for the same `fingerprint`, uncompressed loss and compression target)."""
    cfg = model.config
    unit = "h'" if splits is None else "width"
    recorded = LayerInputs()
    with recorded.recording(model):
        base = probe.loss(model)
    fingerprint = {**(fingerprint or {}), "method": method, "objective": probe.objective, "tokens": probe.tokens}
    done = load_progress(progress, fingerprint, base, log)
    delta: dict[int, dict[int, float]] = {}
    saved: dict[int, dict[int, tuple]] = {}
    for layer in range(cfg.num_hidden_layers):
        delta[layer], saved[layer] = {}, {}
        block = model.model.layers[layer]
        original = block.self_attn
        targets = {m: m for m in levels} if splits is None else {m: splits[layer][m] for m in levels
                                                                  if m in splits[layer]}
        try:
            for m, target in targets.items():  # swap in the compressed attention of this one layer, measure, restore
                kept = done.get(layer, {}).get(m)
                if kept is not None and json.loads(json.dumps(target)) == kept[0]:
                    delta[layer][m] = kept[1]
                else:
                    block.self_attn, _ = factor_attention(original, target, method=method,
                                                          sigma=moments[layer] if moments is not None else None,
                                                          key_stats=key_moments[layer] if key_moments else None)
                    with recorded.starting_at(model, layer):
                        delta[layer][m] = probe.loss(model) - base
                saved[layer][m] = (target, delta[layer][m])
        finally:
            block.self_attn = original
        if progress is not None:
            write_json_atomic(progress, {"fingerprint": fingerprint, "base_loss": base, "delta_loss": saved})
        log(f"layer {layer:2d}: " + ", ".join(f"{unit}={m}: {d:+.4f}" for m, d in delta[layer].items()))
    result = {"base_loss": base, "levels": levels, "unit": unit, "method": method, "objective": probe.objective,
              "tokens": probe.tokens, "delta_loss": delta}
    return result if splits is None else {**result, "splits": splits}


def probe_markdown(result: dict) -> str:
    levels, unit = result["levels"], result.get("unit", "h'")
    rows = ["| layer | " + " | ".join(f"Δloss {unit}={m}" for m in levels) + " |", "|---|" + "---|" * len(levels)]
    rows += [f"| {layer} | " + " | ".join(f"{d[m]:+.4f}" if m in d else "—" for m in levels) + " |"
             for layer, d in result["delta_loss"].items()]
    return (f"Base loss {result['base_loss']:.4f} nats/token on {result['tokens']} probe tokens "
            f"({result['method']}, objective {result.get('objective', 'text')}).\n\n" + "\n".join(rows) + "\n")


def plot_probe(result: dict, path) -> None:
    from ..plotting import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    layers = sorted(result["delta_loss"], key=int)
    unit = result.get("unit", "h'")
    for m in result["levels"]:
        rows = [l for l in layers if m in result["delta_loss"][l]]
        ax.plot([int(l) for l in rows], [result["delta_loss"][l][m] for l in rows], marker="o",
                label=f"{unit}={m}")
    ax.set_xlabel("layer compressed (alone)")
    ax.set_ylabel("Δ validation loss (nats/token)")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.legend()
    ax.set_title("Layer sensitivity to virtual-head compression")
    save_figure(fig, path)
