"""`mea export --to llama`: an MEA model with h' = 1 in every layer is exactly a multi-query Llama."""

import pytest
import torch
from helpers import randomize_mea, tiny_config
from transformers import LlamaForCausalLM

import mea
from mea.convert import export_mqa

MQA = dict(mea_num_component_heads=1, mea_head_norm=False)


def _logits_diff(cfg_overrides: dict) -> tuple[float, LlamaForCausalLM, mea.MEAForCausalLM]:
    model = randomize_mea(mea.MEAForCausalLM(tiny_config(**cfg_overrides)), scale=1.0).eval()
    plain = export_mqa(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 23))
    with torch.no_grad():
        diff = (plain(ids).logits - model(ids).logits).abs().max().item()
    return diff, plain, model


@pytest.mark.parametrize("overrides", [
    {},  # head-level HLC
    {"attention_bias": True, "attention_out_bias": True},  # q bias goes through the absorbed map too
    {"mea_key_mixing": "rope_pair", "mea_value_mixing": "latent",
     "mea_value_latent_dim": tiny_config().head_dim},  # per-pair complex keys, a D-wide value latent
])
def test_export_is_exact_multi_query_llama(overrides):
    diff, plain, model = _logits_diff({**MQA, **overrides})
    assert plain.config.num_key_value_heads == 1
    assert plain.config.num_attention_heads == model.config.num_attention_heads
    assert plain.model.layers[0].self_attn.k_proj.weight.shape == (model.config.head_dim, model.config.hidden_size)
    assert diff < 1e-5


def test_export_scales_query_rows_and_output_columns():
    """Head mixing: query rows of head i times W^K[0, G(i)], o_proj columns times W^V[0, G(i)]."""
    _, plain, model = _logits_diff(MQA)
    attn, out = model.model.layers[1].self_attn, plain.model.layers[1].self_attn
    n, h, d = model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim
    group = torch.arange(n) // (n // h)
    wk, wv = attn.hlc_k[0, group], attn.hlc_v[0, group]  # (N,)
    q = attn.q_proj.weight.view(n, d, -1) * wk[:, None, None]
    o = attn.o_proj.weight.view(-1, n, d) * wv[None, :, None]
    torch.testing.assert_close(out.q_proj.weight, q.reshape(n * d, -1))
    torch.testing.assert_close(out.o_proj.weight, o.reshape(-1, n * d))


@pytest.mark.parametrize("overrides, words", [
    ({"mea_num_component_heads": 2, "mea_head_norm": False}, "h'_K=2"),
    ({"mea_num_component_heads": 1, "mea_num_value_components": 2, "mea_head_norm": False}, "h'_V=2"),
    ({"mea_num_component_heads": 1, "mea_head_norm": True}, "GroupNorm"),
    ({"mea_hlc": False, "mea_head_norm": False}, "no HLC"),
])
def test_export_refuses_plans_it_cannot_reproduce(overrides, words):
    model = mea.MEAForCausalLM(tiny_config(**overrides))
    with pytest.raises(ValueError, match=words) as err:
        export_mqa(model)
    assert "mea serve" in str(err.value) and "mea fold" in str(err.value)


def test_export_cli_writes_llama_with_identical_logits(tmp_path):
    from mea.checkpoint import load_causal_lm, save_atomic
    from mea.commands import cmd_export

    model = randomize_mea(mea.MEAForCausalLM(tiny_config(**MQA)), scale=1.0).eval()
    save_atomic(model, tmp_path / "src")
    res = cmd_export(str(tmp_path / "src"), str(tmp_path / "out"), to="llama")
    assert res["architecture"] == "LlamaForCausalLM" and res["max_abs_logit_diff_on_check"] < 1e-5
    plain = load_causal_lm(tmp_path / "out")
    assert isinstance(plain, LlamaForCausalLM) and plain.config.num_key_value_heads == 1
    ids = torch.randint(0, model.config.vocab_size, (1, 17))
    with torch.no_grad():
        assert (plain(ids).logits - model(ids).logits).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="export to one of"):
        cmd_export(str(tmp_path / "src"), str(tmp_path / "out2"), to="qwen3")
