"""Shared test helpers: tiny configs, a tiny random Llama checkpoint, padded batches."""

from pathlib import Path

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


def save_tiny_llama(root: Path) -> Path:
    """A tiny random Llama (3 layers, 6 query / 3 KV heads) with a 320-token BPE tokenizer trained on the
    held-out text, saved to `root` (no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from mea.data import heldout_text

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([heldout_text()[:200_000]], trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<eos>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=96, intermediate_size=160,
                                         num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=3,
                                         max_position_embeddings=2048, eos_token_id=0, pad_token_id=0))
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root


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


def padding_mask(b, t, s, lengths):
    """bool (B, 1, T, S): causal with the last T queries of S keys, left padding of `lengths` real tokens."""
    past = s - t
    key = torch.arange(s)
    causal = key[None, :] <= torch.arange(past, s)[:, None]
    valid = torch.stack([key >= s - n for n in lengths])  # (B, S)
    m = causal[None] & valid[:, None]
    return (m | (key[None, :] == torch.arange(past, s)[:, None])[None])[:, None]


def run_cli(capsys, *argv):
    """`mea ARGV` in this process: (exit code, the printed JSON when it succeeded, stderr)."""
    import json

    from mea.cli import main

    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if code == 0 else None), out.err
