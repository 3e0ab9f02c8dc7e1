import pytest
import torch
from helpers import left_padded_batch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from mea.convert import to_mea

SHAPE = dict(vocab_size=101, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=3, max_position_embeddings=256)

FAMILIES = {
    "llama": (LlamaForCausalLM, LlamaConfig, dict(attention_bias=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "mistral": (MistralForCausalLM, MistralConfig, dict(sliding_window=None)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config, dict(head_dim=24, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 64})),
}


def perturbed(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_conversion_is_exact(family):
    cls, cfg_cls, extra = FAMILIES[family]
    src = perturbed(cls(cfg_cls(**SHAPE, **extra)))
    ours = to_mea(src)
    assert ours.config.mea_hlc and not ours.config.mea_head_norm
    ids, mask = left_padded_batch(101, lengths=(9, 5, 7))
    with torch.no_grad():
        a, b = src(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits
        g1 = src.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        g2 = ours.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    real = mask.bool()
    assert (a[real] - b[real]).abs().max() < 1e-4
    assert torch.equal(g1, g2)


def test_unsupported_family_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'.*llama, mistral, qwen2, qwen3"):
        to_mea(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)))
