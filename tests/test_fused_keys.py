"""The fused C++ reads of quantized keys and values (`ops.fused_keys`) against the other reads and a float64
reference, their dispatch (`ops.attention.quantized_key_read`, `quantized_value_read`) and their fallback where
the extension cannot be built."""

import logging
import platform

import pytest
import torch

from mea.ops import attention as attention_ops
from mea.ops import fused_keys
from mea.ops.kvquant import QuantizedTokens, quantize_keys, quantize_values

# |logit error| / sum_d |q_d| (|s_d c_d| + |z_d|): float32 accumulation of E <= 128 terms stays far below this;
# the block read in bfloat16 (keys rounded to bfloat16, 8 bits of mantissa) within a few 2^-8.
FLOAT32_TOLERANCE = 1e-6
BFLOAT16_TOLERANCE = 2**-7
# Values: |error| / sum_t p_t (|s_t c_t| + |z_t|); float32 sums over up to 1500 tokens in chunks of 1024.
VALUE_FLOAT32_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def extension():
    module = fused_keys.load()
    if module is None:
        pytest.skip("the fused key read's C++ extension cannot be built on this machine (see the log line)")
    return module


def _keys(b, g, n, e, bits, group, *, capacity_extra=0, seed=0):
    """Quantized keys as the cache holds them: views of the first n tokens of larger buffers (strided)."""
    torch.manual_seed(seed)
    x = torch.randn(b, g, n + capacity_extra, e)
    x[..., 1] = 6 + 3 * x[..., 1]  # an offset outlier channel: large zero points, as real keys have
    codes, scale, zero = quantize_keys(x, bits, group)
    cut = n // group
    return QuantizedTokens(codes[:, :, :n], scale[:, :, :cut], zero[:, :, :cut], x[:, :, :0], bits, group,
                           per_channel=True)


def _reference(q, keys):
    """(float64 logits, the magnitude sum_d |q_d| (|s_d c_d| + |z_d|) each logit's rounding is relative to)."""
    k = keys.dequantize().double()  # exact: codes times float16 scales plus float16 zero points
    zero = keys.zero.double().repeat_interleave(keys.group_size, dim=2)
    size = q.double().abs() @ ((k - zero).abs() + zero.abs()).transpose(-1, -2)
    return q.double() @ k.transpose(-1, -2), size


CASES = [  # (B, G, R, E, tokens, group)
    (2, 3, 3, 64, 192, 64),  # plain GQA heads of 64, R = 3 query rows per KV head, B > 1
    (1, 3, 1, 64, 128, 64),  # one query row
    (2, 1, 9, 128, 256, 64),  # an absorbed layer: one 128-wide head, 9 rows
    (2, 2, 5, 32, 72, 24),  # groups of 24 tokens: a partial tile of 16 in every group
    (1, 2, 4, 24, 48, 8),  # E = 24: the general loop (no whole vectors at 4 bits), groups of 8
    (2, 2, 2, 40, 80, 16),  # E = 40: whole vectors and a scalar rest
]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_read_matches_reference_and_block_read(extension, bits, case, dtype):
    b, g, r, e, n, group = case
    keys = _keys(b, g, n, e, bits, group, capacity_extra=2 * group)
    q = torch.randn(b, g, r, e).to(dtype)
    ref, size = _reference(q, keys)
    tail = 5  # logits of full-precision tokens after the codes: the read leaves them alone
    fused = torch.full((b, g, r, n + tail), float("nan"))
    fused_keys.key_scores(q, keys.codes, keys.scale, keys.zero, fused, bits=bits, group_size=group)
    assert fused[..., n:].isnan().all()
    assert ((fused[..., :n].double() - ref).abs() / size).max() < FLOAT32_TOLERANCE  # float32 even for bf16 q
    blocks = torch.empty(b, g, r, n)
    attention_ops._key_scores_blocks(q, keys, blocks)
    tolerance = FLOAT32_TOLERANCE if dtype == torch.float32 else BFLOAT16_TOLERANCE
    assert ((blocks.double() - ref).abs() / size).max() < tolerance


@pytest.mark.slow  # two builds of about a minute each
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction-set variants")
@pytest.mark.parametrize("march", ["haswell", "x86-64"])  # AVX2 only; SSE2 only (the generic vector code)
def test_other_instruction_sets_compute_the_same_outputs(extension, march):
    variant = fused_keys.build(cflags=("-O3", f"-march={march}", "-fopenmp"),
                               name="mea_key_scores_" + march.replace("-", "_"))
    for bits in (8, 4):
        for b, g, r, e, n, group in CASES:
            keys = _keys(b, g, n, e, bits, group, capacity_extra=group)
            q = torch.randn(b, g, r, e)
            ref, size = _reference(q, keys)
            scores = torch.empty(b, g, r, n)
            variant.key_scores(q, keys.codes, keys.scale, keys.zero, scores, bits, group)
            assert ((scores.double() - ref).abs() / size).max() < FLOAT32_TOLERANCE
        for b, g, r, e, n, group in VALUE_CASES:  # two rows per pass without AVX-512
            values = _values(b, g, n, e, bits, group, capacity_extra=group)
            p = torch.softmax(torch.randn(b, g, r, n), dim=-1)
            ref, size = _value_reference(p, values)
            sums = torch.zeros(b, g, r, e)
            variant.value_sums(p, values.codes, values.scale, values.zero, sums, bits, group)
            assert ((sums.double() - ref).abs() / size).max() < VALUE_FLOAT32_TOLERANCE


def _fused_read(product, bits):
    """A zero-argument call of one fused read over 40 groups of 64 tokens, returning a new output."""
    if product == "keys":
        keys, q = _keys(2, 3, 64 * 40, 64, bits, 64), torch.randn(2, 3, 3, 64)

        def read():
            scores = torch.empty(2, 3, 3, 64 * 40)
            fused_keys.key_scores(q, keys.codes, keys.scale, keys.zero, scores, bits=bits, group_size=64)
            return scores
    else:
        values, p = _values(2, 3, 64 * 40, 64, bits, 64), torch.softmax(torch.randn(2, 3, 3, 64 * 40), dim=-1)

        def read():
            sums = torch.zeros(2, 3, 3, 64)
            fused_keys.value_sums(p, values.codes, values.scale, values.zero, sums, bits=bits, group_size=64)
            return sums
    return read


@pytest.mark.parametrize("product", ["keys", "values"])
@pytest.mark.parametrize("bits", [8, 4])
def test_threads_split_the_work_without_changing_an_output(extension, product, bits):
    read = _fused_read(product, bits)
    out = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out.append(read())
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out[0], out[1])


def test_dispatch(extension, monkeypatch):
    keys = _keys(1, 1, 64, 64, 4, 64)
    q = torch.randn(1, 1, 2, 64)
    monkeypatch.delenv(attention_ops.KEY_READ_ENV, raising=False)
    assert attention_ops.quantized_key_read(keys, q) == "fused"
    assert attention_ops.quantized_key_read(keys, q.requires_grad_()) == "blocks"  # no backward in the kernel
    with torch.no_grad():
        assert attention_ops.quantized_key_read(keys, q) == "fused"
    monkeypatch.setenv(attention_ops.KEY_READ_ENV, "blocks")
    assert attention_ops.quantized_key_read(keys, q.detach()) == "blocks"
    monkeypatch.setenv(attention_ops.KEY_READ_ENV, "fast")
    with pytest.raises(ValueError, match="MEA_KEY_READ must be one of auto, blocks"):
        attention_ops.quantized_key_read(keys, q.detach())


def test_failed_build_falls_back_to_blocks_with_one_log_line(monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(fused_keys, "SOURCE", tmp_path / "missing.cpp")
    monkeypatch.delenv(attention_ops.KEY_READ_ENV, raising=False)
    fused_keys.load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=fused_keys.__name__):
            keys, q = _keys(1, 1, 64, 16, 8, 16), torch.randn(1, 1, 2, 16)
            assert attention_ops.quantized_key_read(keys, q) == "blocks"
            assert attention_ops.quantized_key_read(keys, q) == "blocks"  # tried once: no second attempt, no log
            values = _values(1, 1, 64, 64, 8, 64)
            assert attention_ops.quantized_value_read(values, q) in ("int4pack", "blocks")
        records = [r for r in caplog.records if r.name == fused_keys.__name__]
        assert len(records) == 1 and "keys are read in blocks" in records[0].getMessage()
    finally:
        fused_keys.load.cache_clear()  # the next caller builds or loads the real extension


def test_extension_name_is_a_module_name_tied_to_this_cpu():
    name = fused_keys.extension_name()
    assert name.isidentifier() and name.startswith("mea_key_scores_") and name == fused_keys.extension_name()


def _values(b, g, n, e, bits, group, *, capacity_extra=0, seed=0):
    """Quantized values as the cache holds them: views of the first n tokens of larger buffers (strided)."""
    torch.manual_seed(seed)
    x = torch.randn(b, g, n + capacity_extra, e) + 2  # an offset: zero points of one sign, as real values have
    codes, scale, zero = quantize_values(x, bits, group)
    return QuantizedTokens(codes[..., :n, :], scale[:, :, :n], zero[:, :, :n], x[:, :, :0], bits, group,
                           per_channel=False)


def _value_reference(p, values):
    """(float64 p @ V, the magnitude sum_t p_t (|s_t c_t| + |z_t|) each output's rounding is relative to)."""
    v = values.dequantize().double()
    zero = values.zero.double().repeat_interleave(values.shape[3] // values.zero.shape[3], dim=3)
    return p.double() @ v, p.double() @ ((v - zero).abs() + zero.abs())


VALUE_CASES = [  # (B, G, R, E, tokens, group)
    (2, 3, 3, 64, 1500, 64),  # plain GQA heads of 64, R = 3, B > 1, two chunks of tokens, the last partial
    (1, 3, 1, 64, 130, 64),  # one query row, tokens not a multiple of 64
    (2, 1, 9, 128, 300, 64),  # an absorbed layer: one 128-wide head (two planes), 9 rows
    (2, 1, 5, 96, 200, 32),  # a value latent of 96: planes of 32 features, groups of 32
    (1, 2, 6, 48, 70, 16),  # planes of 16 features: the one-code-at-a-time loop
]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("case", VALUE_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_value_read_matches_reference_and_other_reads(extension, bits, case, dtype):
    b, g, r, e, n, group = case
    values = _values(b, g, n, e, bits, group, capacity_extra=37)
    p = torch.softmax(4 * torch.randn(b, g, r, n + 3), dim=-1)[..., :n].to(dtype)  # a view, as decoding passes it
    ref, size = _value_reference(p, values)
    start = torch.randn(b, g, r, e)  # the read adds to what is there (the full-precision tail's share)
    fused = start.clone()
    fused_keys.value_sums(p, values.codes, values.scale, values.zero, fused, bits=bits, group_size=group)
    assert (((fused - start).double() - ref).abs() / size).max() < VALUE_FLOAT32_TOLERANCE  # float32 for bf16 p too
    blocks = torch.zeros(b, g, r, e)
    attention_ops._values_blocks(p.float(), values, blocks, 128)
    assert ((blocks.double() - ref).abs() / size).max() < VALUE_FLOAT32_TOLERANCE
    if e % 64 == 0 and group % 64 == 0 and n % attention_ops.INT4PACK_GROUP == 0 and attention_ops.int4pack_layout_matches():
        packed = torch.zeros(b, g, r, e)
        attention_ops._values_int4pack(p.float(), values, packed)
        assert ((packed.double() - ref).abs() / size).max() < BFLOAT16_TOLERANCE


def test_value_read_dispatch(extension, monkeypatch):
    values = _values(1, 1, 128, 64, 8, 64)
    p = torch.rand(1, 1, 2, 128)
    monkeypatch.delenv(attention_ops.VALUE_READ_ENV, raising=False)
    assert attention_ops.quantized_value_read(values, p) == "fused"
    assert attention_ops.quantized_value_read(values, p.requires_grad_()) == "blocks"  # no backward in the kernel
    assert attention_ops.quantized_value_read(_values(1, 1, 64, 64, 8, 32), p.detach()) == "blocks"  # 2 scales a plane
    monkeypatch.setenv(attention_ops.VALUE_READ_ENV, "int4pack")
    assert attention_ops.quantized_value_read(values, p.detach()) == (
        "int4pack" if attention_ops.cpu_capability()["cpu_native_bf16"] and attention_ops.int4pack_layout_matches()
        else "blocks")
    monkeypatch.setenv(attention_ops.VALUE_READ_ENV, "blocks")
    assert attention_ops.quantized_value_read(values, p.detach()) == "blocks"
    monkeypatch.setenv(attention_ops.VALUE_READ_ENV, "fused")
    with pytest.raises(ValueError, match="MEA_VALUE_READ must be one of auto, int4pack, blocks"):
        attention_ops.quantized_value_read(values, p.detach())
