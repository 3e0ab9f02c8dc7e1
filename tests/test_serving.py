"""The serving integration's engine-free parts (main environment): per-layer engine shapes, weight mapping,
the comparison of served and reference continuations. The engine itself: tests/test_serving_vllm.py."""

import pytest
import torch
from helpers import randomize_mea, tiny_config

import mea
from mea.ops import absorb_query, read_values
from mea.serving.check import compare
from mea.serving.layout import padded_width, serving_elements_per_token, serving_layers
from mea.serving.reference import greedy_reference, prompt_ids
from mea.serving.weights import folded_projection, per_query_head

CPU_SIZES = [32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512]  # vLLM's CPU attention


def test_plain_layers_are_gqa_and_compressed_layers_one_wide_head():
    cfg = tiny_config(mea_num_key_components=[3, 1], mea_num_value_components=[3, 2])  # h = 3, D = 16
    plain, comp = serving_layers(cfg)
    assert (plain.absorbed, plain.num_kv_heads, plain.key_width, plain.head_size) == (False, 3, 16, 16)
    assert (comp.absorbed, comp.num_kv_heads, comp.key_width, comp.value_width) == (True, 1, 16, 32)
    assert comp.head_size == 32  # keys padded to the value width: one width for both
    assert serving_elements_per_token(cfg) == 2 * 3 * 16 + 2 * 32


def test_padding_to_the_kernels_head_sizes():
    cfg = tiny_config(num_attention_heads=6, num_key_value_heads=3, head_dim=64, hidden_size=384,
                      mea_num_key_components=[2, 1], mea_value_mixing="latent", mea_value_latent_dim=[64, 100])
    first, second = serving_layers(cfg, CPU_SIZES)
    assert (first.key_width, first.value_width, first.head_size) == (128, 64, 128)
    assert (second.key_width, second.value_width, second.head_size) == (64, 100, 112)
    assert padded_width(96, CPU_SIZES) == 96 and padded_width(97, None) == 97
    with pytest.raises(ValueError, match="exceeds the engine's largest head size"):
        padded_width(600, CPU_SIZES)


def test_unservable_models_are_named():
    with pytest.raises(ValueError, match="QK-norm"):
        serving_layers(tiny_config(use_qk_norm=True, mea_num_component_heads=1))
    serving_layers(tiny_config(use_qk_norm=True))  # h' = h with QK-norm is plain GQA: fine
    with pytest.raises(ValueError, match="Differential"):
        serving_layers(tiny_config(mea_differential=True, mea_hlc=False, num_attention_heads=6,
                                   num_key_value_heads=2))


@pytest.mark.parametrize("kind", ["head", "latent"])
def test_folded_projection_gives_the_composite_heads(kind):
    extra = dict(mea_value_mixing="latent", mea_value_latent_dim=48) if kind == "latent" else {}
    model = randomize_mea(mea.MEAForCausalLM(tiny_config(attention_bias=True, **extra)), scale=1.0)
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 5, model.config.hidden_size)
    _, v_ref = attn.composite_kv(x)
    weight, bias = folded_projection(attn.v_proj.weight, attn.v_proj.bias, attn.hlc_v, attn.value_mixing,
                                     attn.head_dim)
    torch.testing.assert_close(torch.nn.functional.linear(x, weight, bias).view_as(v_ref), v_ref)


@pytest.mark.parametrize("key_kind, value_kind", [("head", "head"), ("rope_pair", "latent")])
def test_per_query_head_mixing_on_a_slice_of_heads(key_kind, value_kind):
    """A tensor-parallel rank holding query heads [start, stop) computes their part of the full maths."""
    n, h, d, m, r = 6, 3, 8, 2, 12
    w_k = torch.randn((m, h) if key_kind == "head" else (m, h, 2, d // 2))
    w_v = torch.randn((m, h) if value_kind == "head" else (r, h, d))
    q = torch.randn(1, 4, n, d)
    u = torch.randn(1, 4, n, m * d if value_kind == "head" else r)
    full_q, full_out = absorb_query(q, w_k, key_kind, h), read_values(u, w_v, value_kind, h, d)
    for start, stop in ((0, 3), (3, 6), (1, 5)):
        local_q = absorb_query(q[:, :, start:stop], per_query_head(w_k, num_heads=n, start=start, stop=stop),
                               key_kind, stop - start)
        local_out = read_values(u[:, :, start:stop], per_query_head(w_v, num_heads=n, start=start, stop=stop),
                                value_kind, stop - start, d)
        torch.testing.assert_close(local_q, full_q[:, :, start:stop])
        torch.testing.assert_close(local_out, full_out[:, :, start:stop])


def test_reference_rows_follow_generate_and_compare_flags_differences():
    model = randomize_mea(mea.MEAForCausalLM(tiny_config(mea_num_component_heads=1)), scale=1.0).eval()
    prompts = prompt_ids(model.config.vocab_size, 3, 9)
    assert [len(p) for p in prompts] == [9, 6, 3]
    rows = greedy_reference(model, prompts, 5)
    for row in rows:  # each row equals its own unpadded greedy run
        ids = torch.tensor([row["prompt"]])
        with torch.no_grad():
            alone = model.generate(ids, max_new_tokens=5, do_sample=False)[0, ids.shape[1]:].tolist()
            logits = model(torch.tensor([row["prompt"] + row["tokens"]])).logits[0, len(row["prompt"]) - 1:-1]
        assert row["tokens"] == alone
        chosen = logits.log_softmax(-1).gather(-1, torch.tensor(row["tokens"])[:, None])[:, 0]
        assert max(abs(a - b) for a, b in zip(row["logprobs"], chosen.tolist())) < 1e-4
    assert compare(rows, rows)["passed"]
    off = [dict(row, logprobs=[x + 2e-4 for x in row["logprobs"]]) for row in rows]
    res = compare(rows, off)
    assert res["tokens_equal"] and not res["passed"] and res["max_abs_logprob_diff"] > 1e-4
    swapped = [dict(rows[0], tokens=rows[0]["tokens"][:2] + [rows[0]["tokens"][2] + 1] + rows[0]["tokens"][3:])]
    res = compare(rows[:1], swapped)
    assert not res["tokens_equal"] and res["first_mismatch"] == [2]


def test_serve_without_the_serving_environment_says_how_to_build_it(tmp_path):
    from mea.commands import cmd_serve

    model = mea.MEAForCausalLM(tiny_config())
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="make serve-env"):
        cmd_serve(str(tmp_path / "m"), python=str(tmp_path / "no-such-python"))
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        cmd_serve(str(tmp_path / "missing"))
