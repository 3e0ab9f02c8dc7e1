"""Multi-query associative recall (MQAR, as in the Zoology benchmark): a sequence lists key-value pairs,
then asks for the values of some keys; the model must recall each. Small models of each variant are
trained from scratch on fresh random sequences and scored on a fixed held-out set, per seed.

    k1 v1 k2 v2 ... kN vN  q1 a1 q2 a2 ... qM aM        (a_i = the value paired with key q_i)

Keys and values use disjoint token ranges; the loss and the accuracy count only the answers a_i.
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from ..models import MEAForCausalLM, make_config
from ..models.head_norm_init import head_output_rms, measure_head_norm_init
from ..precision import resolve_device


def mqar_batch(batch: int, *, pairs: int, queries: int, num_keys: int, num_values: int,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, 2N + 2M), answer positions mask (B, 2N + 2M - 1) over next-token targets)."""
    if pairs > num_keys:
        raise ValueError(f"pairs ({pairs}) must not exceed the number of distinct keys ({num_keys})")
    keys = torch.stack([torch.randperm(num_keys, generator=generator)[:pairs] for _ in range(batch)])  # (B, N)
    values = num_keys + torch.randint(0, num_values, (batch, pairs), generator=generator)  # (B, N)
    pick = torch.randint(0, pairs, (batch, queries), generator=generator)  # (B, M)
    q, a = keys.gather(1, pick), values.gather(1, pick)
    context = torch.stack([keys, values], dim=2).flatten(1)  # (B, 2N): k1 v1 k2 v2 ...
    asked = torch.stack([q, a], dim=2).flatten(1)  # (B, 2M): q1 a1 q2 a2 ...
    ids = torch.cat([context, asked], dim=1)
    is_answer = torch.zeros_like(ids, dtype=torch.bool)
    is_answer[:, 2 * pairs + 1 :: 2] = True
    return ids, is_answer[:, 1:]  # target t+1 is an answer


def mqar_config(variant: str, *, num_keys: int, num_values: int, hidden_size: int = 64, layers: int = 2, **overrides):
    return make_config("tiny", variant, vocab_size=num_keys + num_values, hidden_size=hidden_size,
                       intermediate_size=2 * hidden_size, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=hidden_size // 4, **overrides)


def train_mqar(variant: str, *, seed: int = 0, pairs: int = 4, queries: int = 4, num_keys: int = 16,
               num_values: int = 16, steps: int = 800, batch: int = 64, lr: float = 1e-3, eval_size: int = 512,
               device: str | None = None, norm_warmup: int = 0, **model_overrides) -> dict:
    """Train one small model on MQAR (on `device`, default `precision.default_device`, in float32) and return
    its held-out recall accuracy. `norm_warmup` > 0 (with `mea_head_norm_blend`): the blend toward the
    normalised head output is not learned but set to min(1, step / norm_warmup), so the model ends as MEA."""
    torch.manual_seed(seed)
    dev = resolve_device(device)
    cfg = mqar_config(variant, num_keys=num_keys, num_values=num_values, **model_overrides)
    if norm_warmup and not cfg.mea_head_norm_blend:
        raise ValueError("norm_warmup schedules the GroupNorm blend: give mea_head_norm_blend=True with it")
    model = MEAForCausalLM(cfg).to(dev)
    model.config.use_cache = False
    spec = dict(pairs=pairs, queries=queries, num_keys=num_keys, num_values=num_values)
    eval_ids, eval_answer = (x.to(dev) for x in mqar_batch(eval_size, generator=torch.Generator().manual_seed(
        10_000 + seed), **spec))  # a fixed set
    # a batch of its own for a measured GroupNorm init: the training stream is untouched
    first = mqar_batch(batch, generator=torch.Generator().manual_seed(20_000 + seed), **spec)[0]
    measured = measure_head_norm_init(model, first[:, :-1].to(dev))  # None unless the config asks for it
    rms_at_init = head_output_rms(model, eval_ids[:, :-1])
    blends = [layer.self_attn.head_norm_blend for layer in model.model.layers] if norm_warmup else []
    for a in blends:
        a.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        for a in blends:
            a.fill_(min(1.0, step / norm_warmup))
        ids, answer = (x.to(dev) for x in mqar_batch(batch, generator=gen, **spec))
        logits = model(input_ids=ids[:, :-1]).logits
        loss = F.cross_entropy(logits[answer], ids[:, 1:][answer])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        pred = model(input_ids=eval_ids[:, :-1]).logits.argmax(-1)
    accuracy = (pred[eval_answer] == eval_ids[:, 1:][eval_answer]).float().mean().item()
    attention = [layer.self_attn for layer in model.model.layers]
    learned = {name: [getattr(a, name).tolist() for a in attention]  # GroupNorm variations' per-head values
               for name in ("head_gain", "head_norm_blend") if getattr(attention[0], name, None) is not None}
    return {"variant": variant, "seed": seed, "accuracy": accuracy, "final_train_loss": loss.item(), **spec,
            "steps": steps, "kv_cache_bytes_per_token": cfg.kv_cache_bytes_per_token(), "learned": learned,
            "head_output_rms": {"init": rms_at_init, "end": head_output_rms(model, eval_ids[:, :-1])},
            "head_norm_measured_init": measured}


def mqar_sweep(variants: list[str], seeds: list[int], *, log=None, **kwargs) -> dict:
    runs = []
    for v in variants:
        for s in seeds:
            runs.append(train_mqar(v, seed=s, **kwargs))
            if log:
                log(f"mqar {v} seed {s}: accuracy {runs[-1]['accuracy']:.3f}")
    summary = {}
    for v in variants:
        acc = [r["accuracy"] for r in runs if r["variant"] == v]
        summary[v] = {"mean": statistics.mean(acc), "std": statistics.stdev(acc) if len(acc) > 1 else None,
                      "seeds": len(acc)}
    return {"runs": runs, "summary": summary, "settings": kwargs}
