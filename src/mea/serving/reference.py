"""The reference side of the serving checks, run in the main environment: `mea`'s own greedy `generate` (the
compressed cache, batch > 1, left padding) on fixed token-id prompts, with the log-probability of every
generated token, the same tokens' log-probabilities in float64 (the error of each fp32 side is measured
against those) and from one uncached fp32 forward (how far two of `mea`'s own fp32 paths, cached decode and
uncached forward, already differ: the rounding floor of the model). Writes JSON that `serving.check` compares
vLLM against.

    python -m mea.serving.reference MODEL OUT.json [--new-tokens N] [--prompts P] [--prompt-tokens T]
"""

from __future__ import annotations

import argparse

import torch

from ..atomic import write_json_atomic

DEFAULT_PROMPTS = 4  # prompts per model (one left-padded batch)
DEFAULT_PROMPT_TOKENS = 24  # tokens of the longest prompt; the others are shorter, so the batch is padded
DEFAULT_NEW_TOKENS = 16


def prompt_ids(vocab_size: int, count: int, length: int, seed: int = 0) -> list[list[int]]:
    """`count` fixed prompts of lengths length, length - 3, ... (token ids drawn from a seeded generator)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (max(1, length - 3 * i),), generator=g).tolist() for i in range(count)]


@torch.no_grad()
def greedy_reference(model, prompts: list[list[int]], new_tokens: int) -> list[dict]:
    """Greedy continuations of all prompts in one left-padded batch, and each token's log-probability."""
    width = max(map(len, prompts))
    pad = 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=pad)
    tokens = out.sequences[:, width:]  # (B, new)
    logprobs = torch.stack(out.logits, dim=1).float().log_softmax(-1)  # (B, new, V)
    chosen = logprobs.gather(-1, tokens[..., None])[..., 0]
    return [{"prompt": p, "tokens": t.tolist(), "logprobs": lp.tolist()} for p, t, lp in zip(prompts, tokens, chosen)]


@torch.no_grad()
def teacher_forced_logprobs(model, rows: list[dict]) -> list[list[float]]:
    """Log-probabilities of each row's tokens from one uncached forward over prompt + tokens (run it in float64
    for a reference that both fp32 sides can be measured against)."""
    out = []
    for row in rows:
        ids = torch.tensor([row["prompt"] + row["tokens"]])
        logprobs = model(ids).logits[0, len(row["prompt"]) - 1:-1].log_softmax(-1)
        out.append(logprobs.gather(-1, torch.tensor(row["tokens"])[:, None])[:, 0].tolist())
    return out


def main(argv: list[str] | None = None) -> None:
    from ..checkpoint import load_causal_lm

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--new-tokens", type=int, default=DEFAULT_NEW_TOKENS)
    ap.add_argument("--prompts", type=int, default=DEFAULT_PROMPTS)
    ap.add_argument("--prompt-tokens", type=int, default=DEFAULT_PROMPT_TOKENS)
    args = ap.parse_args(argv)
    model = load_causal_lm(args.model, dtype=torch.float32).eval()
    prompts = prompt_ids(model.config.vocab_size, args.prompts, args.prompt_tokens)
    rows = greedy_reference(model, prompts, args.new_tokens)
    for row, logprobs in zip(rows, teacher_forced_logprobs(model, rows)):
        row["logprobs_fp32_uncached"] = logprobs
    exact = load_causal_lm(args.model, dtype=torch.float64).eval()
    for row, logprobs in zip(rows, teacher_forced_logprobs(exact, rows)):
        row["logprobs_float64"] = logprobs
    write_json_atomic(args.out, {"model": args.model, "dtype": "float32", "rows": rows})


if __name__ == "__main__":
    main()
