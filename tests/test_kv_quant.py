"""The quantized KV cache: primitives against float references, the block-wise decode against attention over
the dequantized cache, cached decoding against the float cache, storage operations (growth, beam reorder,
crop), the configuration fields, and the same storage behind a plain transformers model."""

import pytest
import torch

import mea
from mea.cache import GROWTH_BLOCK, MEACache, PlainQuantizedCache, cache_bytes_used
from mea.ops import attention as attention_ops
from mea.ops.kvquant import (
    KVQuant,
    dequantize_keys,
    dequantize_values,
    error_bound,
    from_planes,
    pack,
    quantize_keys,
    quantize_reference,
    quantize_values,
    to_planes,
    unpack,
    value_plane_width,
)
from tests.helpers import incremental_logits, left_padded_batch, randomize_mea, save_tiny_llama, tiny_config

# Cached decoding, quantized vs float cache (tiny random models, logits of order 1): max |logit difference|.
LOGIT_TOLERANCE = {8: 0.006, 4: 0.1}  # about twice the largest difference seen over these cases


def _keys_with_outliers(b=2, g=3, s=128, e=32, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(b, g, s, e)
    x[..., 3] = 8 + 4 * x[..., 3]  # an outlier channel with an offset, as real keys have
    return x


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("keys", [True, False])
def test_round_trip_error_within_documented_bound(bits, keys):
    x = _keys_with_outliers()
    quantize, dequantize = (quantize_keys, dequantize_keys) if keys else (quantize_values, dequantize_values)
    codes, scale, zero = quantize(x, bits, 16)
    assert codes.dtype == torch.uint8 and codes.numel() == x.numel() * bits // 8
    assert scale.dtype == zero.dtype == torch.float16
    assert scale.shape == ((2, 3, 128 // 16, 32) if keys else (2, 3, 128, 32 // 16))
    err = (dequantize(codes, scale, zero, bits, torch.float32).double() - x.double()).abs()
    bound = error_bound(x, bits, 16, keys=keys)
    assert (err <= bound + 1e-9).all()
    assert err.max() > 0.2 * bound.max()  # the bound is not vacuous
    ref_err = (quantize_reference(x, bits, 16, keys=keys) - x.double()).abs()
    assert err.mean() < 1.1 * ref_err.mean()  # float16 scales cost almost nothing against the float64 reference


def test_per_channel_keys_beat_per_token_on_outlier_channels():
    """Why keys are quantized per channel (KIVI): an outlier channel inflates every per-token step."""
    x = _keys_with_outliers()
    per_channel = dequantize_keys(*quantize_keys(x, 4, 16), 4, torch.float32)
    per_token = dequantize_values(*quantize_values(x, 4, 16), 4, torch.float32)
    normal = [c for c in range(16) if c != 3]  # the outlier's group of features
    assert (per_channel - x)[..., normal].abs().mean() < 0.5 * (per_token - x)[..., normal].abs().mean()


def test_pack_unpack_round_trip():
    codes = torch.randint(0, 16, (2, 3, 5, 8), dtype=torch.uint8)
    packed = pack(codes, 4)
    assert packed.shape == (2, 3, 5, 4)
    assert torch.equal(unpack(packed, 4), codes)
    assert torch.equal(packed[..., 0], codes[..., 0] | (codes[..., 4] << 4))  # features j and j + E/2


@pytest.mark.parametrize("bits,features", [(4, 128), (8, 128), (4, 32), (8, 64)])
def test_value_planes_round_trip(bits, features):
    codes = torch.randint(0, 2**bits, (2, 3, 7, features), dtype=torch.uint8)
    planes = to_planes(codes, bits)
    w = value_plane_width(features)
    assert planes.shape == (2, 3, features // w * bits // 4, 7, w // 2)
    assert torch.equal(from_planes(planes, bits), codes)
    assert torch.equal(from_planes(planes[..., 2:5, :], bits), codes[:, :, 2:5])  # a span of tokens


@pytest.mark.skipif(not attention_ops.int4pack_layout_matches(), reason="no packed int4 CPU matmul in this torch")
def test_value_planes_are_torch_int4pack_layout():
    """A plane is, byte for byte, torch's packed int4 CPU layout of the (features x tokens) codes: the packed
    matmul over it computes p @ V."""
    codes = torch.randint(0, 16, (1, 1, 128, 64), dtype=torch.uint8)  # (B, G, S, E): one plane
    plane = to_planes(codes, 4)[0, 0, 0]  # (S, 32)
    p = torch.rand(3, 128)
    units = torch.tensor([1.0, 8.0]).expand(2, 64, 2).contiguous()  # scale 1, zero 8: the plain codes
    got = torch._weight_int4pack_mm_for_cpu(p, plane.view(64, 64), 64, units)
    torch.testing.assert_close(got, p @ codes[0, 0].float())


def _filled_store(quant: KVQuant, chunks, b=3, g=2, ek=16, ev=16, seed=0):
    """A cache layer filled by `chunks` appends of (B, T, G, E) head-major tokens; returns it and the float
    tokens appended."""
    torch.manual_seed(seed)
    cache = MEACache(1, kv_quant=quant)
    ks, vs = [], []
    for t in chunks:
        k, v = torch.randn(b, t, g, ek), torch.randn(b, t, g, ev)
        cache.update(k, v, 0, heads_first=True)
        ks.append(k)
        vs.append(v)
    return cache, torch.cat(ks, 1).transpose(1, 2), torch.cat(vs, 1).transpose(1, 2)  # (B, G, S, E)


def _check_store(cache, k_ref, v_ref, quant: KVQuant):
    layer = cache.layers[0]
    keys, values = layer.store.views()
    s = k_ref.shape[2]
    q = keys.quantized
    assert keys.shape[2] == values.shape[2] == s == layer.length
    assert q % quant.group_size == 0
    assert torch.equal(keys.tail, k_ref[:, :, q:]) and torch.equal(values.tail, v_ref[:, :, q:])  # exact tail
    assert ((keys.dequantize() - k_ref)[:, :, :q].abs() <= error_bound(k_ref[:, :, :q], quant.bits,
                                                                        quant.group_size, keys=True) + 1e-6).all()
    assert ((values.dequantize() - v_ref)[:, :, :q].abs() <= error_bound(v_ref[:, :, :q], quant.bits,
                                                                          quant.group_size, keys=False) + 1e-6).all()


def test_growth_past_block_boundary_keeps_tokens():
    quant = KVQuant(bits=4, group_size=8, residual=5)
    chunks = [37] + [1] * (GROWTH_BLOCK - 30) + [50]  # prefill, one token at a time past 256, a chunk
    cache, k_ref, v_ref = _filled_store(quant, chunks)
    assert k_ref.shape[2] > GROWTH_BLOCK
    assert cache.layers[0].store.k_codes.shape[2] == 2 * GROWTH_BLOCK  # grown once, by a block
    _check_store(cache, k_ref, v_ref, quant)
    assert cache.layers[0].store.quantized == quant.quantized_tokens(k_ref.shape[2])
    assert cache.layers[0].store.tail_len <= quant.residual + quant.group_size - 1


def test_reorder_and_crop_with_quantized_storage():
    quant = KVQuant(bits=8, group_size=8, residual=3)
    cache, k_ref, v_ref = _filled_store(quant, [40, 1, 1, 1])
    beams = torch.tensor([2, 0, 0])
    cache.reorder_cache(beams)
    k_ref, v_ref = k_ref[beams], v_ref[beams]
    _check_store(cache, k_ref, v_ref, quant)
    keys, values = (x.dequantize() for x in cache.layers[0].store.views())
    cache.crop(-10)  # transformers 5: remove 10 tokens; 33 left, inside the codes' last group
    assert cache.get_seq_length() == 33
    k2, v2 = (x.dequantize() for x in cache.layers[0].store.views())
    assert torch.equal(k2, keys[:, :, :33]) and torch.equal(v2, values[:, :, :33])
    cache.crop(20)  # a positive length keeps that many tokens
    assert cache.get_seq_length() == 20
    assert torch.equal(cache.layers[0].store.views()[0].dequantize(), keys[:, :, :20])
    cache.crop(0)  # generate's no-op
    assert cache.get_seq_length() == 20
    k, v = torch.randn(3, 30, 2, 16), torch.randn(3, 30, 2, 16)  # keeps growing after the crop
    cache.update(k, v, 0, heads_first=True)
    got = cache.layers[0].store.views()[1].dequantize()
    assert got.shape[2] == 50 and torch.equal(got[:, :, :20], values[:, :, :20])


def _decode_case(quantized_tokens: int, tail: int, *, b=2, g=3, r=4, e=16, seed=0, quant=None):
    quant = quant or KVQuant(bits=4, group_size=8, residual=tail)
    cache, _, _ = _filled_store(quant, [quantized_tokens + tail], b=b, g=g, ek=e, ev=e, seed=seed)
    keys, values = cache.layers[0].store.views()
    q = torch.randn(b, g, r, e)
    return q, keys, values


@pytest.mark.parametrize("key_read", ["auto", "blocks"])  # auto: the fused C++ key read where it builds
@pytest.mark.parametrize("use_mask,use_factor", [(False, False), (True, False), (False, True), (True, True)])
def test_decode_blocks_equals_attention_over_dequantized_cache(monkeypatch, use_mask, use_factor, key_read):
    monkeypatch.setattr(attention_ops, "DEQUANT_BLOCK", 16)  # several blocks, plus the tail
    monkeypatch.setenv(attention_ops.KEY_READ_ENV, key_read)
    q, keys, values = _decode_case(64, 5)
    b, g, r, _ = q.shape
    s = keys.shape[2]
    mask = torch.rand(b, 1, r, s) > 0.5 if use_mask else None
    if mask is not None:
        mask[..., 20:40] = False  # a block no row sees
        mask[..., -1] = True
    factor = torch.rand(b, 1, r, s) + 0.5 if use_factor else None
    assert attention_ops.quantized_value_read(values, q) == "blocks"  # planes of 16 features: converted blocks
    out = attention_ops.decode_blocks(q, keys, values, mask=mask, scale=0.25, factor=factor)
    k, v = keys.dequantize().double(), values.dequantize().double()
    scores = q.double() @ k.transpose(-1, -2) * 0.25
    if factor is not None:
        scores = scores * factor.double()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    ref = torch.softmax(scores, -1) @ v
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


# value read forced -> (the read that must run, max |error| / max |output|): torch's packed int4 matmul takes
# bfloat16 weights (2^-7); the fused C++ read and the block read accumulate in float32
VALUE_READ_TOLERANCE = {"auto": ("fused", 1e-5), "int4pack": ("int4pack", 2**-7), "blocks": ("blocks", 1e-5)}


@pytest.mark.parametrize("value_read", list(VALUE_READ_TOLERANCE))
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("e", [64, 128])  # one plane per storage head (plain GQA), two (an absorbed layer)
def test_value_reads_equal_attention_over_dequantized_cache(monkeypatch, value_read, bits, e):
    """Each value read of the stored planes, through `decode_blocks` with batch 2 and a full-precision tail."""
    monkeypatch.setenv(attention_ops.VALUE_READ_ENV, value_read)
    q, keys, values = _decode_case(192, 5, e=e, quant=KVQuant(bits, 64, 5))
    expected, tolerance = VALUE_READ_TOLERANCE[value_read]
    if attention_ops.quantized_value_read(values, q) != expected:  # the dispatch itself says what this CPU takes
        pytest.skip(f"the {expected} value read does not run on this machine")
    out = attention_ops.decode_blocks(q, keys, values, mask=None, scale=0.125)
    k, v = keys.dequantize().double(), values.dequantize().double()
    ref = torch.softmax(q.double() @ k.transpose(-1, -2) * 0.125, -1) @ v
    assert (out.double() - ref).abs().max() <= tolerance * ref.abs().max()


def _pair(bits, **kw):
    """A float-cache model and the same weights with a quantized cache."""
    torch.manual_seed(0)
    ref = randomize_mea(mea.MEAForCausalLM(tiny_config(**kw)).eval())
    q = mea.MEAForCausalLM(tiny_config(**kw, mea_kv_bits=bits, mea_kv_group_size=8, mea_kv_residual=4)).eval()
    q.load_state_dict(ref.state_dict())
    return ref, q


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("kw", [{}, {"mea_num_component_heads": 1}, {"mea_num_component_heads": 2, "use_qk_norm": True},
                                {"use_qk_norm": True},
                                # value latents 12 and 6 wide, which groups of 8 do not divide (groups of 4 and 2)
                                {"mea_value_mixing": "latent", "mea_value_latent_dim": [12, 6],
                                 "mea_num_key_components": [2, 1]}])
def test_cached_decoding_close_to_float_cache(monkeypatch, bits, kw):
    """Batch 3, left padding, 40 tokens read one at a time after a 12-token prefill: the logits stay within
    LOGIT_TOLERANCE of the float cache's; the prefill is exact."""
    monkeypatch.setattr(attention_ops, "DEQUANT_BLOCK", 16)
    ref, quantized = _pair(bits, **kw)
    ids, mask = left_padded_batch(97, lengths=(52, 40, 30))
    with torch.no_grad():
        want, _ = incremental_logits(ref, ids, mask, prefill=12)
        got, cache = incremental_logits(quantized, ids, mask, prefill=12)
    assert all(layer.store is not None for layer in cache.layers)
    assert torch.equal(got[:, :12], want[:, :12])  # prefill attends to the exact new tokens
    real = mask.bool()[:, 12:]
    diff = (got[:, 12:] - want[:, 12:]).abs().amax(-1)[real]
    assert diff.max() < LOGIT_TOLERANCE[bits]
    assert diff.max() > 0  # the cache really is quantized
    assert cache_bytes_used(cache) == 3 * quantized.config.kv_cache_bytes(52, bytes_per_element=4)


def test_generate_uses_quantized_cache_and_holds_predicted_bytes():
    _, model = _pair(4, mea_num_component_heads=2)
    ids, mask = left_padded_batch(97, lengths=(9, 5))
    out = model.generate(ids, attention_mask=mask, max_new_tokens=70, min_new_tokens=70, do_sample=False,
                         return_dict_in_generate=True, pad_token_id=0)
    tokens = out.cache.get_seq_length()
    assert cache_bytes_used(out.cache) == 2 * model.config.kv_cache_bytes(tokens, bytes_per_element=4)
    float_bytes = 2 * mea.MEAForCausalLM(tiny_config(mea_num_component_heads=2)).config.kv_cache_bytes(tokens, 4)
    assert cache_bytes_used(out.cache) < float_bytes / 3


def test_beam_search_with_quantized_cache():
    ref, model = _pair(8)
    ids, mask = left_padded_batch(97, lengths=(9, 6))
    kw = dict(attention_mask=mask, max_new_tokens=12, num_beams=3, do_sample=False, pad_token_id=0)
    want, got = ref.generate(ids, **kw), model.generate(ids, **kw)
    assert got.shape == want.shape
    assert (got == want).float().mean() > 0.9  # int8 keeps the beams (tiny random model)


def test_setting_saved_and_loaded(tmp_path):
    _, model = _pair(4)
    model.save_pretrained(tmp_path)
    loaded = mea.MEAForCausalLM.from_pretrained(tmp_path)
    assert (loaded.config.mea_kv_bits, loaded.config.mea_kv_group_size, loaded.config.mea_kv_residual) == (4, 8, 4)
    out = loaded.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, return_dict_in_generate=True)
    assert out.cache.layers[0].store is not None


def test_value_groups_of_widths_the_group_size_does_not_divide():
    quant = KVQuant(bits=4, group_size=64, residual=0)
    assert [quant.value_group(w) for w in (128, 64, 32, 96, 136)] == [64, 64, 32, 32, 8]
    quant.check_features(32, "a latent", latent=True)  # a narrow value latent quantizes in groups of 32
    with pytest.raises(ValueError, match="must divide head_dim"):
        quant.check_features(32, "head_dim")  # head-wide values keep the group they were given
    with pytest.raises(ValueError, match="must divide a latent"):
        quant.check_features(33, "a latent", latent=True)  # no even group
    # bytes per token follow the groups: 32 value features in one group of 32, 64 keys' features per 64 tokens
    assert quant.bytes_per_token(64, 32) == 32 + 16 + 2 * 2 * (64 / 64 + 32 / 32)


@pytest.mark.parametrize("fields,message", [
    (dict(mea_kv_bits=3), "mea_kv_bits must be one of"),
    (dict(mea_kv_bits=4, mea_kv_group_size=6), "must divide head_dim"),
    (dict(mea_kv_bits=4, mea_kv_group_size=7), "even number"),
    (dict(mea_kv_bits=8, mea_kv_residual=-1), "mea_kv_residual"),
    (dict(mea_kv_bits=4, mea_differential=True, mea_hlc=False), "differential"),
])
def test_bad_settings_fail_at_config_time(fields, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**fields)


def test_plain_model_cache_matches_mea_at_full_heads(tmp_path):
    """`mea-kv4` on an original transformers model holds what MEA at h' = h with a 4-bit cache holds and gives
    its logits."""
    from mea.convert import to_mea
    from mea.eval.peers import cache_system
    from transformers import LlamaForCausalLM

    llama = LlamaForCausalLM.from_pretrained(save_tiny_llama(tmp_path)).eval()
    converted = to_mea(llama)
    converted.config.mea_kv_bits, converted.config.mea_kv_group_size = 4, 16  # the system's group: gcd(64, 16)
    model = mea.MEAForCausalLM(converted.config).eval()
    model.load_state_dict(converted.state_dict())
    ids = torch.randint(1, 300, (1, 200), generator=torch.Generator().manual_seed(0))
    plain_cache = cache_system("mea-kv4").make_cache(llama)
    assert isinstance(plain_cache, PlainQuantizedCache)
    with torch.no_grad():
        llama(ids[:, :100], cache=plain_cache, use_cache=True)
        want = llama(ids[:, 100:], cache=plain_cache, use_cache=True).logits
        mea_cache = MEACache(model.config.num_hidden_layers)
        model(ids[:, :100], cache=mea_cache)
        got = model(ids[:, 100:], cache=mea_cache).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert cache_bytes_used(plain_cache) == cache_bytes_used(mea_cache) == model.config.kv_cache_bytes(200, 4)


def test_cache_system_names():
    from mea.eval.peers import cache_system

    with pytest.raises(ValueError, match="bits must be one of"):
        cache_system("mea-kv2")
    torch.manual_seed(0)
    model = mea.MEAForCausalLM(tiny_config(mea_num_component_heads=1)).eval()
    cache = cache_system("mea-kv8").make_cache(model)
    with torch.no_grad():
        model(torch.randint(1, 97, (1, 80)), cache=cache)
    assert cache.layers[0].store is not None and cache.layers[0].store.quant.bits == 8


def test_quantize_cache_command_rewrites_config(tmp_path, capsys):
    import json

    from mea.cli import main

    torch.manual_seed(0)
    mea.MEAForCausalLM(tiny_config(mea_num_component_heads=2)).save_pretrained(tmp_path / "m")
    assert main(["quantize-cache", str(tmp_path / "m"), "--kv-bits", "4", "--group-size", "8"]) == 0
    report = json.loads(capsys.readouterr().out)
    loaded = mea.MEAForCausalLM.from_pretrained(tmp_path / "m")
    assert (loaded.config.mea_kv_bits, loaded.config.mea_kv_group_size) == (4, 8) == (report["mea_kv_bits"], 8)
    assert report["kv_bytes_per_token"] == loaded.config.kv_cache_bytes_per_token()
    assert main(["quantize-cache", str(tmp_path / "m"), "--kv-bits", "4", "--group-size", "12"]) == 2  # 12 ∤ 16
    assert "must divide head_dim" in capsys.readouterr().err
    assert mea.MEAForCausalLM.from_pretrained(tmp_path / "m").config.mea_kv_group_size == 8  # left as it was
    assert main(["quantize-cache", str(tmp_path / "m"), "--kv-bits", "0"]) == 0
    assert mea.MEAForCausalLM.from_pretrained(tmp_path / "m").config.kv_quant() is None
    save_tiny_llama(tmp_path / "llama")
    assert main(["quantize-cache", str(tmp_path / "llama"), "--kv-bits", "8"]) == 2
    assert "mea convert" in capsys.readouterr().err


def test_set_kv_quant_on_a_loaded_model():
    from mea.kv_setting import set_kv_quant

    ref, _ = _pair(8)
    model = set_kv_quant(mea.MEAForCausalLM(ref.config).eval(), 8, group_size=8, residual=4)
    model.load_state_dict(ref.state_dict())
    with pytest.raises(ValueError, match="mea_kv_bits must be one of"):
        set_kv_quant(model, 2)
    assert model.config.mea_kv_bits == 8  # a rejected setting changes nothing
    cache = MEACache(model.config.num_hidden_layers)
    with torch.no_grad():
        model(torch.randint(1, 97, (1, 30)), cache=cache)
    assert cache.layers[0].store.quant == KVQuant(bits=8, group_size=8, residual=4)
