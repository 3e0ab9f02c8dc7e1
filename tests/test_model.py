import pytest
import torch
from helpers import incremental_logits, left_padded_batch, randomize_mea, tiny_config
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, pipeline

import mea
from mea.convert import export_plain, fold_hlc
from mea.convert.fold import plain_config_fields


def max_err(a, b):
    return (a - b).abs().max().item()


def llama_twin(cfg: mea.MEAConfig) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(**plain_config_fields(cfg))).eval()


def test_identity_hlc_without_groupnorm_equals_llama():
    cfg = tiny_config(mea_head_norm=False)
    ours = mea.MEAForCausalLM(cfg).eval()
    llama = llama_twin(cfg)
    llama.load_state_dict({k: v for k, v in ours.state_dict().items() if ".hlc_" not in k})
    ids, mask = left_padded_batch(cfg.vocab_size)
    with torch.no_grad():
        assert max_err(ours(ids).logits, llama(ids).logits) < 1e-5
        a = ours(ids, attention_mask=mask).logits
        b = llama(ids, attention_mask=mask).logits
    real = mask.bool()
    assert max_err(a[real], b[real]) < 1e-5


@pytest.mark.parametrize("overrides", [
    dict(),  # h' = h, MEA
    dict(mea_num_component_heads=[1, 2]),  # h' < h, per layer
    dict(mea_num_component_heads=1, use_qk_norm=True, attention_bias=True),  # Qwen3/Qwen2 features, compressed
    dict(use_qk_norm=True),  # h' = h with QK-norm: composite heads cached, mixed and normed at write time
    dict(mea_hlc=False, mea_head_norm=False, use_qk_norm=True),  # baseline GQA decode path
], ids=["h'=h", "h'<h", "qknorm+bias", "h'=h+qknorm", "baseline"])
def test_cached_decoding_equals_full_forward_left_padded_batch3(overrides):
    cfg = tiny_config(**overrides)
    model = randomize_mea(mea.MEAForCausalLM(cfg)).eval()
    ids, mask = left_padded_batch(cfg.vocab_size, lengths=(11, 8, 5), total=11)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        inc, cache = incremental_logits(model, ids, mask, prefill=6)
        # a multi-token step through the cache (absorbed path with T > 1)
        out = model(ids[:, :4], attention_mask=mask[:, :4], use_cache=True)
        chunk = model(ids[:, 4:], attention_mask=mask, cache=out.cache).logits
    real = mask.bool()
    assert max_err(inc[real], full[real]) < 1e-4
    assert max_err(chunk[real[:, 4:]], full[:, 4:][real[:, 4:]]) < 1e-4
    assert cache.get_seq_length() == 11


def test_generate_with_cache_equals_generate_without():
    cfg = tiny_config(mea_num_component_heads=1)
    model = randomize_mea(mea.MEAForCausalLM(cfg)).eval()
    ids, mask = left_padded_batch(cfg.vocab_size, lengths=(6, 3, 5))
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kw)
        uncached = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, uncached)


def test_cache_holds_only_component_heads():
    ids = torch.randint(0, 97, (2, 10))
    held = {}
    for m in (1, 2, 3):
        model = mea.MEAForCausalLM(tiny_config(mea_num_component_heads=m)).eval()
        with torch.no_grad():
            cache = model(ids, use_cache=True).cache
        for layer in cache.layers:
            assert layer.num_heads == m and layer.values.shape == layer.keys.shape
        held[m] = cache.bytes_used()
        assert held[m] == 10 * 2 * model.config.kv_cache_bytes_per_token(bytes_per_element=4)
    assert held[1] * 3 == held[3] and held[2] * 3 == held[3] * 2


@pytest.mark.parametrize("heads_first", [False, True])
def test_cache_layer_grows_in_blocks_and_keeps_its_contents(heads_first):
    from mea.cache import GROWTH_BLOCK, MEACacheLayer

    layer, chunks = MEACacheLayer(), []
    for t in (3, GROWTH_BLOCK - 2, 5):  # the third update crosses a block boundary: one reallocation
        k = torch.randn(2, t, 2, 4)
        chunks.append(k)
        keys, values = layer.update(k, k + 1, heads_first=heads_first)
    assert keys.shape == (2, GROWTH_BLOCK + 6, 2, 4) and layer.num_heads == 2
    assert torch.equal(keys, torch.cat(chunks, dim=1)) and torch.equal(values, keys + 1)
    assert layer.bytes_held() == 2 * 2 * (2 * GROWTH_BLOCK) * 2 * 4 * 4
    assert layer.bytes_used() == 2 * 2 * (GROWTH_BLOCK + 6) * 2 * 4 * 4


def test_generate_preallocates_exactly_the_generation_length():
    model = mea.MEAForCausalLM(tiny_config(mea_num_component_heads=1)).eval()
    ids = torch.randint(1, 97, (1, 5))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=7, do_sample=False, return_dict_in_generate=True)
    cache = out.cache
    assert cache.get_seq_length() == 11  # the last generated token is never fed back
    per_token = model.config.kv_cache_bytes_per_token(bytes_per_element=4)
    assert cache.bytes_held() == 11 * per_token


def test_save_load_roundtrip_and_pipeline(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(96)} | {"[UNK]": 96}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="w0", eos_token="w1")
    model = randomize_mea(mea.MEAForCausalLM(tiny_config(mea_num_component_heads=[2, 1]))).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "mea"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, mea.MEAForCausalLM)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    gen = pipeline("text-generation", model=loaded, tokenizer=tokenizer)
    text = gen("w5 w6 w7", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text.startswith("w5 w6 w7") and text.count("w") == 7  # 4 new word tokens


def test_training_step_reduces_loss_and_reaches_hlc():
    model = mea.MEAForCausalLM(tiny_config(mea_num_component_heads=2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 97, (4, 16))
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        losses.append(loss.item())
        assert model.model.layers[0].self_attn.hlc_k.grad.abs().sum() > 0
        opt.step()
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("overrides", [
    dict(mea_head_norm=False),
    dict(mea_head_norm=False, use_qk_norm=True, attention_bias=True),
    dict(mea_head_norm=True),
])
def test_fold_is_exact(overrides):
    model = randomize_mea(mea.MEAForCausalLM(tiny_config(**overrides))).eval()
    plain = export_plain(model)
    expected = {(False, False): "LlamaForCausalLM", (False, True): "Qwen3ForCausalLM"}.get(
        (model.config.mea_head_norm, model.config.use_qk_norm), "MEAForCausalLM")
    assert type(plain).__name__ == expected
    if expected == "MEAForCausalLM":
        assert not plain.config.mea_hlc
    ids, mask = left_padded_batch(97)
    with torch.no_grad():
        a, b = model(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits
    assert max_err(a[mask.bool()], b[mask.bool()]) < 1e-4


def test_fold_rejects_compressed_model():
    with pytest.raises(ValueError, match="h' = h"):
        fold_hlc(mea.MEAForCausalLM(tiny_config(mea_num_component_heads=1)))


@pytest.mark.parametrize("overrides, message", [
    (dict(num_attention_heads=6, num_key_value_heads=4), "multiple of num_key_value_heads"),
    (dict(mea_num_component_heads=0), r"\[1, 3\]"),
    (dict(mea_num_component_heads=4), r"h' <= h"),
    (dict(mea_num_component_heads=[1, 2, 3]), "3 entries but the model has 2 layers"),
    (dict(mea_hlc=False, mea_num_component_heads=1), "needs mea_hlc=True"),
    (dict(mea_hlc_init="bogus"), "mea_hlc_init must be one of"),
    (dict(mea_hlc_init="identity", mea_num_component_heads=2), "needs h' = h"),
    (dict(mea_bogus=1), "unknown"),
    (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}), "unsupported rope_type"),
    (dict(head_dim=15), "even"),
    (dict(hidden_act="gelu"), "silu"),
])
def test_invalid_configs_raise_clear_value_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)
    with pytest.raises(ValueError, match=message):
        mea.MEAConfig(**{**mea.PRESETS["tiny"], **overrides})


def test_unknown_preset_or_variant():
    with pytest.raises(ValueError, match="unknown preset"):
        mea.make_config("huge")
    with pytest.raises(ValueError, match="unknown variant"):
        mea.make_config("tiny", variant="mla")


@pytest.mark.parametrize("overrides", [dict(mea_num_component_heads=1, use_qk_norm=True),
                                       dict(mea_num_component_heads=[1, 2]), dict()])
def test_cache_grown_by_generate_holds_the_predicted_bytes(overrides):
    """The bytes a cache holds after generate() appended token by token from an empty cache (the model's own
    attention layers choose heads, layout and k-scales), against the configuration's prediction."""
    from mea.bench.kv_check import generated_kv
    from mea.cache import GROWTH_BLOCK

    model = mea.MEAForCausalLM(tiny_config(**overrides)).eval()
    check = generated_kv(model, batch=2, prompt=10, new_tokens=GROWTH_BLOCK + 5)
    per_token = model.config.kv_cache_bytes_per_token(bytes_per_element=4)
    assert check["tokens"] == 10 + GROWTH_BLOCK + 4
    assert check["kv_bytes_used"] == check["kv_bytes_predicted"] == 2 * check["tokens"] * per_token
    assert check["kv_bytes_held"] == 2 * 2 * GROWTH_BLOCK * per_token  # grew once past its first block
