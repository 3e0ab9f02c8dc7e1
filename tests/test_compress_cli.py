"""End to end through the CLI on a tiny random Llama with a small BPE tokenizer (no downloads)."""

import json
import re

import pytest
import torch
from helpers import save_tiny_llama
from transformers import AutoModelForCausalLM

import mea
from mea.cli import main


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("src"))


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if code == 0 else None), out.err


SMALL = ["--calib-windows", "4", "--calib-window", "64", "--fit-steps", "3", "--no-eval"]


def test_convert_compress_load_generate(capsys, tmp_path, tiny_llama_dir):
    code, res, _ = run(capsys, "convert", tiny_llama_dir, tmp_path / "mea")
    assert code == 0 and res["max_abs_logit_diff_on_check"] < 1e-4
    code, res, err = run(capsys, "compress", tiny_llama_dir, tmp_path / "c", "--virtual-heads", "2", *SMALL)
    assert code == 0, err
    assert res["plan"] == [2, 2, 2] and res["kv_fraction"] == pytest.approx(2 / 3)
    measured = res["generated"]
    assert measured["compressed"]["kv_bytes_per_token"] == pytest.approx(
        measured["original"]["kv_bytes_per_token"] * 2 / 3, rel=0.02)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    assert isinstance(model, mea.MEAForCausalLM) and model.config.component_heads() == [2, 2, 2]
    provenance = json.loads((tmp_path / "c" / "mea_provenance.json").read_text())
    assert provenance["method"] == "whitened" and provenance["plan"] == [2, 2, 2]
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)
    # half the layers with the data-free SVD, from the MEA checkpoint, scored on both held-out texts
    code, res, err = run(capsys, "compress", tmp_path / "mea", tmp_path / "c2", "--method", "svd",
                         "--virtual-heads", "1", "--layers", "1", "--recover", "none",
                         "--eval-windows", "2", "--eval-window", "32")
    assert code == 0, err
    assert res["plan"] == [3, 1, 3]
    for key in ("perplexity", "perplexity_modern"):  # Hamlet and the modern text, each for both models
        assert res[key]["tokens"] == 2 * 31
        assert res[key]["compressed"] > 1 and res[key]["original"] > 1
    assert res["perplexity"]["original"] != res["perplexity_modern"]["original"]


def test_kv_budget_probe_and_recover(capsys, tmp_path, tiny_llama_dir):
    code, res, err = run(capsys, "probe", tiny_llama_dir, tmp_path / "probe", "--windows", "2", "--window", "64")
    assert code == 0, err
    table = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert set(table["delta_loss"]) == {"0", "1", "2"} and (tmp_path / "probe" / "probe.md").exists()
    assert not (tmp_path / "probe" / "probe-progress.json").exists()
    code, res, err = run(capsys, "compress", tiny_llama_dir, tmp_path / "b", "--kv-budget", "0.5",
                         "--sensitivity", tmp_path / "probe" / "probe.json", *SMALL)
    assert code == 0, err
    assert sum(res["plan"]) <= 0.5 * 9 and min(res["plan"]) >= 1
    code, res, err = run(capsys, "recover", tmp_path / "b", tmp_path / "r", "--teacher", tiny_llama_dir,
                         "--tokens", "512", "--seq-len", "64", "--batch", "2", "--save-every", "1", "--retrieval-frac", "0",
                         "--domain", "shakespeare", "--no-eval")
    assert code == 0, err
    assert res["distill"]["steps"] == 4
    assert not (tmp_path / "r.state").exists()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "r").config.component_heads() == \
        AutoModelForCausalLM.from_pretrained(tmp_path / "b").config.component_heads()


def test_retrieval_probe_allocates_a_budget(capsys, tmp_path, tiny_llama_dir):
    code, res, err = run(capsys, "probe", tiny_llama_dir, tmp_path / "p", "--windows", "2", "--window", "512",
                         "--objective", "retrieval", "--levels", "1")
    assert code == 0, err
    table = json.loads((tmp_path / "p" / "probe.json").read_text())
    assert table["objective"] == "retrieval" and 0 < table["tokens"] < 2 * 512  # only the answers' tokens
    code, res, err = run(capsys, "compress", tiny_llama_dir, tmp_path / "b", "--kv-budget", "0.5",
                         "--probe-objective", "both", *SMALL)
    assert code == 0, err
    assert sum(res["plan"]) <= 0.5 * 9 and min(res["plan"]) >= 1
    code, res, err = run(capsys, "compress", tiny_llama_dir, tmp_path / "c", "--kv-budget", "0.5", "--method",
                         "rope-pair-latent", "--allocate", "errors", "--probe-objective", "retrieval", *SMALL)
    assert code == 2 and "drop --allocate errors" in err
    code, res, err = run(capsys, "compress", tiny_llama_dir, tmp_path / "d", "--kv-budget", "0.5", "--allocate",
                         "errors", "--probe-floor", "0.3", *SMALL)
    assert code == 2 and "--probe-floor" in err


def test_width_probe_allocates_a_value_latent_budget_across_layers(capsys, tmp_path, tiny_llama_dir):
    """rope-pair-latent with the probe (the default allocation): each layer at a probed width (or whole), h'_K
    and R per layer, the cache within the budget, and the model it writes loads and holds exactly the planned
    bytes."""
    code, res, err = run(capsys, "compress", tiny_llama_dir, tmp_path / "w", "--kv-budget", "0.5", "--method",
                         "rope-pair-latent", "--probe-objective", "both", *SMALL)
    assert code == 0, err
    assert "measuring per-layer sensitivity" in err
    config = AutoModelForCausalLM.from_pretrained(tmp_path / "w").config
    head_dim, heads = config.head_dim, config.num_key_value_heads
    widths = [k * head_dim + r for k, r in res["plan"]]
    assert sum(widths) <= 0.5 * 3 * 2 * heads * head_dim
    assert all(1 <= k <= heads and 1 <= r <= heads * head_dim for k, r in res["plan"])
    assert res["kv_fraction"] == pytest.approx(sum(widths) / (3 * 2 * heads * head_dim))
    assert not (tmp_path / "w.probe-progress.json").exists()  # the probe's progress goes once the model is written
    # its measurements stay beside the model: the same budget from them is the same plan, another budget needs no probe
    table = tmp_path / "w" / "probe.json"
    assert json.loads(table.read_text())["unit"] == "width"
    latent = ["--method", "rope-pair-latent", "--sensitivity", table, *SMALL]
    code, again, err = run(capsys, "compress", tiny_llama_dir, tmp_path / "again", "--kv-budget", "0.5", *latent)
    assert code == 0, err
    assert again["plan"] == res["plan"] and not (tmp_path / "again" / "probe.json").exists()
    code, smaller, err = run(capsys, "compress", tiny_llama_dir, tmp_path / "smaller", "--kv-budget", "0.4", *latent)
    assert code == 0, err
    assert sum(k * head_dim + r for k, r in smaller["plan"]) <= 0.4 * 3 * 2 * heads * head_dim
    assert "measuring per-layer sensitivity" not in err
    code, _, err = run(capsys, "compress", tiny_llama_dir, tmp_path / "heads", "--kv-budget", "0.5",
                       "--sensitivity", table, *SMALL)  # a width table cannot size whole heads
    assert code == 2 and "whole heads" in err
    code, _, err = run(capsys, "compress", tiny_llama_dir, tmp_path / "s", "--kv-budget", "0.5", "--method",
                       "rope-pair-latent", "--allocate", "probe", "--sensitivity", tmp_path / "none.json", *SMALL)
    assert code == 2 and "--sensitivity" in err


def test_answer_loss_scores_exactly_the_answer_tokens(tiny_llama_dir):
    from mea.compress.probe import answer_loss
    from mea.data.retrieval import retrieval_sequence
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    stream = torch.arange(5, 2000) % 200 + 5
    seqs = [retrieval_sequence(tok, stream, length=512, seed=3, index=i, facts=2) for i in range(2)]
    per_token = []
    with torch.no_grad():
        for seq in seqs:
            nll = torch.nn.functional.cross_entropy(model(input_ids=seq.ids[None]).logits[0, :-1], seq.ids[1:],
                                                    reduction="none")  # nll[t] scores token t + 1
            per_token += [nll[t - 1].item() for start, end in seq.answers for t in range(start, end)]
    assert answer_loss(model, seqs) == pytest.approx(sum(per_token) / len(per_token), rel=1e-5)


def test_recover_resumes_exactly(tmp_path, tiny_llama_dir):
    from mea.compress.factor_model import factor_model
    from mea.compress.recover import DistillConfig, distill
    from mea.convert import to_mea

    teacher = to_mea(AutoModelForCausalLM.from_pretrained(tiny_llama_dir)).eval()
    stream = torch.randint(0, teacher.config.vocab_size, (4000,))
    cfg = DistillConfig(tokens=6 * 2 * 32, seq_len=32, batch=2, save_every=2, lr=1e-3, retrieval_frac=0.0)

    def fresh():
        return factor_model(teacher, [2, 2, 2], method="svd")[0]

    straight = fresh()
    distill(straight, teacher, stream, tmp_path / "a", cfg, log=lambda m: None)
    interrupted = fresh()
    import mea.compress.recover as rec

    class Stop(Exception):
        pass

    calls = {"n": 0}
    original = rec.kl_loss

    def failing(*a):  # the run dies inside step 5, after the checkpoint of step 4
        calls["n"] += 1
        if calls["n"] == 5:
            raise Stop
        return original(*a)

    rec.kl_loss = failing
    try:
        with pytest.raises(Stop):
            distill(interrupted, teacher, stream, tmp_path / "b", cfg, log=lambda m: None)
    finally:
        rec.kl_loss = original
    resumed = fresh()
    distill(resumed, teacher, stream, tmp_path / "b", cfg, log=lambda m: None)
    a = json.loads((tmp_path / "a" / "progress.json").read_text())["losses"]
    b = json.loads((tmp_path / "b" / "progress.json").read_text())["losses"]
    assert a == b
    for (n, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


@pytest.mark.parametrize("argv, message", [
    (["compress", "{missing}", "{out}", "--virtual-heads", "2"], "not a checkpoint directory"),
    (["compress", "{src}", "{out}", "--kv-budget", "1.5"], r"\(0, 1\]"),
    (["compress", "{src}", "{out}", "--kv-budget", "0"], r"\(0, 1\]"),
    (["compress", "{src}", "{out}", "--virtual-heads", "4", "--no-eval"], "larger than the model's h = 3"),
    (["compress", "{src}", "{out}", "--virtual-heads", "2", "--calib", "{short}"], "calibration text is too short"),
    (["compress", "{src}", "{out}"], "exactly one of --virtual-heads"),
    (["compress", "{gpt2}", "{out}", "--virtual-heads", "2"], "unsupported architecture 'gpt2'"),
    (["compress", "{corrupt}", "{out}", "--virtual-heads", "2"], "could not load"),
])
def test_bad_inputs_give_clear_errors_and_no_output(capsys, tmp_path, tiny_llama_dir, argv, message):
    from transformers import GPT2Config, GPT2LMHeadModel

    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be.")
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(gpt2)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    paths = dict(src=tiny_llama_dir, out=tmp_path / "out", missing=tmp_path / "nope", short=short, gpt2=gpt2,
                 corrupt=corrupt)
    code, _, err = run(capsys, *[a.format(**paths) for a in argv])
    assert code == 2
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_finer_method_with_a_budget_that_is_not_whole_heads(capsys, tmp_path, tiny_llama_dir):
    """rope-pair keys + a value latent at KV kept 0.4 (2.4 of 6 heads' worth per layer), with the layer-wise fit."""
    code, res, err = run(capsys, "compress", tiny_llama_dir, tmp_path / "f", "--method", "rope-pair-latent",
                         "--kv-budget", "0.4", "--allocate", "errors", *SMALL)
    assert code == 0, err
    assert all(k * 16 + r == 40 for k, r in res["plan"])  # round(0.4 * 2 * 3 * 16 / 8) * 8 floats per layer
    assert res["kv_fraction"] == pytest.approx(40 / 96)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "f")
    assert model.config.mea_key_mixing == "rope_pair" and model.config.value_latent_dims() == [r for _, r in res["plan"]]
    provenance = json.loads((tmp_path / "f" / "mea_provenance.json").read_text())
    assert all(row["rel_error_after"] < row["rel_error_before"] for row in provenance["layerwise_fit"])
    measured = res["generated"]
    assert measured["compressed"]["kv_bytes_per_token"] == pytest.approx(
        measured["original"]["kv_bytes_per_token"] * 40 / 96, rel=0.02)
