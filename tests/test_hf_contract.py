"""The Hugging Face model contract on MEA models: hidden states, attentions (eager), tuples, gradient
checkpointing, attn_implementation, and masks built on the model's device without reading them per step.
Checked against transformers' own Llama where the two are comparable (h' = h, identity HLC, no GroupNorm),
and on compressed models (h' < h) against our own fused path."""

import pytest
import torch
from helpers import left_padded_batch, randomize_mea, tiny_config
from transformers import LlamaConfig, LlamaForCausalLM

import mea
from mea.convert.fold import plain_config_fields
from mea.models.modeling_mea import build_attention_mask

COMPRESSED = {
    "h'<h": dict(mea_num_component_heads=[1, 2]),
    "h'<h+qknorm": dict(mea_num_component_heads=1, use_qk_norm=True),
    "rope_pair+latent": dict(mea_num_key_components=1, mea_key_mixing="rope_pair", mea_value_mixing="latent",
                             mea_value_latent_dim=16),
}


def max_err(a, b):
    return (a - b).abs().max().item()


def twins(attn_implementation: str = "eager"):
    """An MEA model at h' = h with identity HLC and no GroupNorm, and the Llama with the same weights."""
    cfg = tiny_config(mea_head_norm=False)
    ours = mea.MEAForCausalLM._from_config(cfg, attn_implementation=attn_implementation).eval()
    llama = LlamaForCausalLM._from_config(LlamaConfig(**plain_config_fields(cfg)),
                                          attn_implementation=attn_implementation).eval()
    llama.load_state_dict({k: v for k, v in ours.state_dict().items() if ".hlc_" not in k})
    return ours, llama


def compressed(name: str, attn_implementation: str = "sdpa"):
    cfg = tiny_config(**COMPRESSED[name])
    return randomize_mea(mea.MEAForCausalLM._from_config(cfg, attn_implementation=attn_implementation)).eval()


def test_hidden_states_equal_llamas():
    ours, llama = twins("sdpa")
    ids, mask = left_padded_batch(ours.config.vocab_size)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        b = llama(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert len(a) == len(b) == ours.config.num_hidden_layers + 1
    real = mask.bool()
    for x, y in zip(a, b):
        assert max_err(x[real], y[real]) < 1e-5


def test_eager_attentions_equal_llamas_and_sum_to_one():
    ours, llama = twins("eager")
    ids, mask = left_padded_batch(ours.config.vocab_size)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, output_attentions=True).attentions
        b = llama(ids, attention_mask=mask, output_attentions=True).attentions
    assert len(a) == len(b) == ours.config.num_hidden_layers
    real = mask.bool()[:, None, :, None]  # rows of real queries
    for x, y in zip(a, b):
        assert x.shape == y.shape == (3, ours.config.num_attention_heads, ids.shape[1], ids.shape[1])
        assert max_err(x * real, y * real) < 1e-6
        assert max_err(x.sum(-1), torch.ones_like(x.sum(-1))) < 1e-5


@pytest.mark.parametrize("name", COMPRESSED)
def test_eager_equals_sdpa_on_compressed_model_also_through_the_cache(name):
    fused = compressed(name)
    eager = compressed(name, "eager")
    eager.load_state_dict(fused.state_dict())
    ids, mask = left_padded_batch(fused.config.vocab_size, lengths=(9, 6, 4), total=9)
    real = mask.bool()
    with torch.no_grad():
        full = fused(ids, attention_mask=mask).logits
        out = eager(ids, attention_mask=mask, output_attentions=True)
        assert max_err(out.logits[real], full[real]) < 1e-4
        for w in out.attentions:  # every real query row is a distribution over real, earlier keys
            sums = w.sum(-1).transpose(1, 2)[real]  # (real rows, N)
            assert max_err(sums, torch.ones_like(sums)) < 1e-5
            assert (w.masked_fill(mask.bool()[:, None, None, :], 0) * real[:, None, :, None]).abs().max() == 0
        # prefill 5, then one token at a time through the compressed cache
        step = eager(ids[:, :5], attention_mask=mask[:, :5], use_cache=True, output_attentions=True)
        cache = step.cache
        for t in range(5, ids.shape[1]):
            step = eager(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache, use_cache=True,
                         output_attentions=True)
            assert max_err(step.logits[:, 0], full[:, t]) < 1e-4
            for w_step, w_full in zip(step.attentions, out.attentions):  # (B, N, 1, t + 1): row t of the full map
                assert max_err(w_step[:, :, 0], w_full[:, :, t, :t + 1]) < 1e-5


@pytest.mark.parametrize("name", COMPRESSED)
def test_return_dict_false_gives_the_tuple_of_the_output(name):
    model = compressed(name)
    ids, _ = left_padded_batch(model.config.vocab_size)
    with torch.no_grad():
        out = model(ids, labels=ids, use_cache=False, output_hidden_states=True)
        tup = model(ids, labels=ids, use_cache=False, output_hidden_states=True, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 3  # loss, logits, hidden states (None fields left out)
    assert torch.equal(tup[0], out.loss) and torch.equal(tup[1], out.logits)
    assert all(torch.equal(x, y) for x, y in zip(tup[2], out.hidden_states))
    # the hidden states of the compressed model: embeddings, ..., the final norm's output the logits come from
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert torch.equal(out.hidden_states[0], model.model.embed_tokens(ids))
    assert max_err(model.lm_head(out.hidden_states[-1]), out.logits) < 1e-6


@pytest.mark.parametrize("name", COMPRESSED)
def test_gradient_checkpointing_gives_equal_gradients(name):
    model = compressed(name).train()
    ids, mask = left_padded_batch(model.config.vocab_size, lengths=(9, 6, 4), total=9)

    def grads():
        model.zero_grad()
        model(ids, attention_mask=mask, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    with pytest.warns(FutureWarning):  # transformers' old name for activation_checkpointing_enable
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_activation_checkpointing and all(layer.gradient_checkpointing for layer in model.model.layers)
    calls = []
    hook = model.model.layers[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    checkpointed = grads()
    hook.remove()
    assert len(calls) == 2  # the block ran again in the backward pass
    assert plain.keys() == checkpointed.keys() and any(".hlc_" in n for n in plain)
    for n in plain:
        assert max_err(plain[n], checkpointed[n]) < 1e-6, n


def test_attn_implementation_is_honoured_and_checked():
    cfg = tiny_config(mea_num_component_heads=1)
    model = mea.MEAForCausalLM._from_config(cfg)  # the default: the fused kernels
    assert model.config._attn_implementation == "sdpa"
    ids, _ = left_padded_batch(cfg.vocab_size)
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        model(ids, output_attentions=True)
    calls = []
    model.model.layers[0].self_attn.attention_map.register_forward_hook(lambda *a: calls.append(1))
    model(ids)
    assert not calls  # sdpa never forms the probabilities
    model.set_attn_implementation("eager")
    model(ids)
    assert len(calls) == 1  # eager does, every forward
    with pytest.raises(ValueError, match="Flash Attention 2"):  # transformers' own check
        mea.MEAForCausalLM._from_config(cfg, attn_implementation="flash_attention_2")
    model.config._attn_implementation = "flex_attention"  # set around transformers' check: ours names the choices
    with pytest.raises(ValueError, match="'sdpa' or 'eager'"):
        model(ids)


def test_masks_are_built_on_the_models_device():
    # chunked prefill without an attention mask: a causal mask with an offset
    mask = build_attention_mask(None, past=4, q_len=3, device="meta")
    assert mask.device.type == "meta" and mask.shape == (1, 1, 3, 7)
    # a mask held elsewhere than the model lands on the model's device
    padded = torch.ones(2, 7, dtype=torch.long)
    padded[0, 0] = 0
    assert build_attention_mask(padded, past=4, q_len=3, device="meta").device.type == "meta"


@pytest.mark.parametrize("name", COMPRESSED)
def test_decoding_reads_no_mask_value_on_the_host(name):
    """On the meta device every value read on the host raises: a decoding step with an accelerator's mask
    must build its mask without one (which on a GPU would be a host-device synchronisation per step)."""
    model = compressed(name).to("meta")
    b, prompt = 2, 5
    with torch.no_grad():
        cache = model(torch.zeros(b, prompt, dtype=torch.long, device="meta"), use_cache=True).cache
        for t in range(prompt, prompt + 2):
            step = model(torch.zeros(b, 1, dtype=torch.long, device="meta"), cache=cache, use_cache=True,
                         attention_mask=torch.ones(b, t + 1, dtype=torch.long, device="meta"))
            cache = step.cache
    assert step.logits.shape == (b, 1, model.config.vocab_size) and cache.get_seq_length() == prompt + 2
    with pytest.raises(RuntimeError):  # what the old per-step check did
        bool(torch.ones(b, 3, device="meta").all())


def test_eager_differential_attention_equals_fused_and_records_the_differential_map():
    cfg = tiny_config(mea_hlc=False, mea_differential=True, num_key_value_heads=2)
    fused = randomize_mea(mea.MEAForCausalLM(cfg)).eval()
    eager = mea.MEAForCausalLM._from_config(cfg, attn_implementation="eager").eval()
    eager.load_state_dict(fused.state_dict())
    ids, mask = left_padded_batch(cfg.vocab_size)
    real = mask.bool()
    with torch.no_grad():
        out = eager(ids, attention_mask=mask, output_attentions=True)
        assert max_err(out.logits[real], fused(ids, attention_mask=mask).logits[real]) < 1e-4
    for layer, w in zip(fused.model.layers, out.attentions):  # softmax_1 - lambda softmax_2: rows sum to 1 - lambda
        assert w.shape == (3, cfg.num_attention_heads // 2, ids.shape[1], ids.shape[1])
        expected = 1 - layer.self_attn.lambda_full().item()
        assert max_err(w.sum(-1).transpose(1, 2)[real], torch.full_like(w.sum(-1).transpose(1, 2)[real], expected)) < 1e-5


@pytest.mark.parametrize("name", ["h'=h", *COMPRESSED])
def test_eager_decodes_a_quantized_cache_like_the_fused_read(name):
    """Eager attention dequantizes a quantized cache whole; the fused decode reads its codes block by block:
    the same stored numbers, so the same logits."""
    overrides = {} if name == "h'=h" else COMPRESSED[name]
    cfg = tiny_config(**overrides, mea_kv_bits=8, mea_kv_group_size=4)
    fused = randomize_mea(mea.MEAForCausalLM._from_config(cfg, attn_implementation="sdpa")).eval()
    eager = mea.MEAForCausalLM._from_config(cfg, attn_implementation="eager").eval()
    eager.load_state_dict(fused.state_dict())
    ids, mask = left_padded_batch(cfg.vocab_size, lengths=(12, 9, 7), total=12)
    with torch.no_grad():
        caches, logits = {}, {}
        for key, model in (("fused", fused), ("eager", eager)):
            caches[key] = model(ids[:, :5], attention_mask=mask[:, :5], use_cache=True).cache
            logits[key] = [model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=caches[key], use_cache=True,
                                 output_attentions=key == "eager").logits[:, 0] for t in range(5, ids.shape[1])]
    assert caches["fused"].layers[0].store is not None  # the storage really is quantized
    for a, b in zip(logits["fused"], logits["eager"]):
        assert max_err(a, b) < 1e-4


@pytest.mark.parametrize("name", COMPRESSED)
def test_prompt_lookup_decoding_crops_the_cache_and_equals_greedy(name, monkeypatch):
    """Prompt-lookup decoding proposes tokens copied from the prompt, verifies them in one forward pass and
    crops the cache back to the accepted ones (`Cache.crop`): its tokens must be
    greedy decoding's."""
    from mea.cache import MEACacheLayer

    crops, crop = [], MEACacheLayer.crop
    monkeypatch.setattr(MEACacheLayer, "crop", lambda self, n: (crops.append(n), crop(self, n))[1])
    model = compressed(name)
    model.generation_config.pad_token_id = 0
    prompt = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])  # repeats, so candidates get proposed
    greedy = model.generate(prompt, max_new_tokens=12, do_sample=False)
    looked_up = model.generate(prompt, max_new_tokens=12, do_sample=False, prompt_lookup_num_tokens=3)
    assert torch.equal(looked_up, greedy)
    assert any(n != 0 for n in crops)  # rejected candidates were cropped away (transformers passes -k)
