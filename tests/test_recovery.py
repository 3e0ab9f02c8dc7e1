"""Recovery training: precision from the hardware, the retrieval data, the losses and strict resuming."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_compress_cli import run, tiny_llama_dir  # noqa: F401  (fixture)
from transformers import AutoModelForCausalLM, AutoTokenizer

from mea import precision
from mea.checkpoint import write_checksums
from mea.compress.factor_model import factor_model
from mea.compress.recover import (DistillConfig, attention_match_loss, attention_outputs, batch_at, distill,
                                  is_retrieval_row, kl_loss)
from mea.convert import to_mea
from mea.data.retrieval import retrieval_sequence

AVX2 = {"cpu_capability": "AVX2", "cpu_bf16_flags": [], "cpu_native_bf16": False}
SAPPHIRE = {"cpu_capability": "AVX512", "cpu_bf16_flags": ["amx_bf16", "avx512_bf16"], "cpu_native_bf16": True}


# --- precision ---------------------------------------------------------------------------------------------

def test_auto_dtype_follows_native_bf16():
    assert precision.auto_dtype("cpu", AVX2) == torch.float32
    assert precision.auto_dtype("cpu", SAPPHIRE) == torch.bfloat16


def test_auto_dtype_on_cuda_follows_bf16_support(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision.auto_dtype("cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert precision.auto_dtype("cuda") == torch.float32


@pytest.mark.parametrize("flags, native", [({"avx2", "fma"}, False), ({"avx512f", "avx512_bf16"}, True),
                                          ({"avx2", "amx_bf16", "amx_tile"}, True), ({"asimd", "bf16"}, True),
                                          (set(), False)])
def test_capability_from_cpu_flags(monkeypatch, flags, native):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
    cap = precision.cpu_capability()
    assert cap["cpu_native_bf16"] is native
    assert cap["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert precision.resolve("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
    assert precision.resolve("fp32", "cpu") == torch.float32 and precision.resolve("bf16", "cpu") == torch.bfloat16


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="auto, fp32, bf16"):
        precision.resolve("fp16", "cpu")
    with pytest.raises(ValueError, match="auto, fp32, bf16"):
        DistillConfig(precision="half").check()


# --- retrieval sequences -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok(tiny_llama_dir):  # noqa: F811
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_retrieval_sequence_is_seeded_exact_and_answerable(tok):
    source = torch.arange(1000, 6000) % len(tok)
    a = retrieval_sequence(tok, source, length=1025, seed=3, index=7, facts=3)
    b = retrieval_sequence(tok, source, length=1025, seed=3, index=7, facts=3)
    c = retrieval_sequence(tok, source, length=1025, seed=3, index=8, facts=3)
    assert torch.equal(a.ids, b.ids) and not torch.equal(a.ids, c.ids)
    assert a.ids.shape == (1025,) and sorted(a.asked) == [0, 1, 2]
    text = tok.decode(a.ids)
    for (start, end), k in zip(a.answers, a.asked):
        fact = a.facts[k]
        assert tok.decode(a.ids[start:end]).strip() == fact.value
        statement = text.index(fact.statement().strip())
        assert statement < text.index(fact.question().strip().split("\n")[0])  # stated before it is asked
    # the running text is one span of the source, in order, and nothing else
    lo, hi = a.source_span
    span = source[lo:hi].tolist()
    it = iter(a.ids.tolist())
    assert all(any(t == u for u in it) for t in span)  # the span is a subsequence of the sequence
    planted = sum(len(tok(f.statement(), add_special_tokens=False).input_ids) for f in a.facts)
    asked = sum(len(tok(a.facts[k].question() + a.facts[k].answer(), add_special_tokens=False).input_ids)
                for k in a.asked)
    assert len(span) + planted + asked >= 1025 >= len(span) + planted  # nothing else was added


def test_retrieval_sequence_rejects_impossible_lengths(tok):
    with pytest.raises(ValueError, match="longer sequences or fewer facts"):
        retrieval_sequence(tok, torch.zeros(5000, dtype=torch.long), length=64, seed=0, facts=4)
    with pytest.raises(ValueError, match="ask"):
        retrieval_sequence(tok, torch.zeros(5000, dtype=torch.long), length=1024, seed=0, facts=2, ask=3)


def test_retrieval_data_never_overlaps_heldout_text(tok):
    """Sequences built from a training stream share no 12-token run with a held-out text, while a held-out
    passage copied into the stream is caught (the check can fail)."""
    from mea.data import heldout_text

    held = tok(heldout_text()[:60_000], add_special_tokens=False).input_ids
    n = 12
    held_grams = {tuple(held[i : i + n]) for i in range(len(held) - n)}
    train_text = " ".join(f"record {i} lists item {i * 7 % 1000} on shelf {i % 97}." for i in range(4000))
    stream = tok(train_text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    cfg = DistillConfig(seq_len=512, batch=2, retrieval_frac=1.0)

    def overlaps(s):
        rows = [batch_at(step, s, cfg, tok) for step in range(8)]
        return sum(tuple(r[i : i + n].tolist()) in held_grams for b in rows for r in b for i in range(len(r) - n))

    assert overlaps(stream) == 0
    leaky = torch.cat([stream[:200], torch.tensor(held[:4000]), stream[200:]])
    assert overlaps(leaky) > 0


def test_retrieval_rows_are_spread_evenly():
    rows = [is_retrieval_row(i, 0.25) for i in range(400)]
    assert sum(rows) == 100 and all(sum(rows[j : j + 4]) == 1 for j in range(0, 400, 4))
    assert not any(is_retrieval_row(i, 0.0) for i in range(50)) and all(is_retrieval_row(i, 1.0) for i in range(50))


# --- losses ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher(tiny_llama_dir):  # noqa: F811
    return to_mea(AutoModelForCausalLM.from_pretrained(tiny_llama_dir)).eval()


def test_kl_is_the_mean_over_every_position(teacher):
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    per_position = (t.log_softmax(-1).exp() * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1)
    assert kl_loss(s, t).item() == pytest.approx(per_position.mean().item(), rel=1e-5)
    s2 = s.clone()
    s2[1, 4] += torch.randn(11) * 3  # the last position of the last row counts
    assert kl_loss(s2, t).item() != pytest.approx(kl_loss(s, t).item(), rel=1e-6)


def test_attention_outputs_hook_every_layer_and_match_loss(teacher):
    student = factor_model(teacher, [2, 2, 2], method="svd")[0]
    x = torch.randint(0, teacher.config.vocab_size, (2, 16))
    with torch.no_grad(), attention_outputs(teacher) as t_out:
        teacher(input_ids=x, use_cache=False)
    with attention_outputs(student) as s_out:
        student(input_ids=x, use_cache=False)
    assert len(t_out) == len(s_out) == teacher.config.num_hidden_layers and t_out[0].shape == (2, 16, 96)
    assert attention_match_loss(t_out, t_out).item() == 0.0
    loss = attention_match_loss(s_out, t_out)
    manual = torch.stack([(s - t).pow(2).sum() / t.pow(2).sum() for s, t in zip(s_out, t_out)]).mean()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5) and loss.item() > 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.model.layers[0].self_attn.parameters())
    with attention_outputs(student, enabled=False) as none:
        student(input_ids=x, use_cache=False)
    assert none == [] and not student.model.layers[0].self_attn._forward_hooks  # hooks removed


def test_distill_with_attention_matching_and_retrieval_mix(tmp_path, teacher, tok):
    stream = torch.randint(0, teacher.config.vocab_size, (6000,))
    cfg = DistillConfig(tokens=4 * 2 * 256, seq_len=256, batch=2, lr=1e-3, attn_match_weight=1.0, retrieval_frac=0.5,
                        precision="fp32", save_every=2)
    student = factor_model(teacher, [2, 2, 2], method="svd")[0]
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    res = distill(student, teacher, stream, tmp_path / "s", cfg, tokenizer=tok, log=lambda m: None)
    assert res["steps"] == 4 and res["precision"] == "fp32" and "cpu_capability" in res
    assert res["seconds_per_step"] > 0
    moved = [n for n, p in student.named_parameters() if not torch.equal(p, before[n])]
    assert moved and all(".self_attn." in n for n in moved)
    with pytest.raises(ValueError, match="tokenizer"):
        distill(student, teacher, stream, tmp_path / "t", cfg, log=lambda m: None)


# --- strict resuming ---------------------------------------------------------------------------------------

def _interrupted_run(tmp_path, teacher):
    stream = torch.randint(0, teacher.config.vocab_size, (4000,))
    cfg = DistillConfig(tokens=2 * 2 * 32, seq_len=32, batch=2, save_every=1, retrieval_frac=0.0, precision="fp32")
    distill(factor_model(teacher, [2, 2, 2], method="svd")[0], teacher, stream, tmp_path / "s",
            DistillConfig(**{**cfg.__dict__, "tokens": 2 * 32}), log=lambda m: None)
    progress = json.loads((tmp_path / "s" / "progress.json").read_text())
    progress["config"] = cfg.__dict__  # the same run, stopped after step 1 of 2
    (tmp_path / "s" / "progress.json").write_text(json.dumps(progress))
    return stream, cfg


@pytest.mark.parametrize("damage, message", [
    ("extra", "unexpected"), ("missing", "missing trained"), ("shape", "does not fit"), ("garbage", "damaged")])
def test_resume_refuses_a_state_that_does_not_fit(tmp_path, teacher, damage, message):
    stream, cfg = _interrupted_run(tmp_path, teacher)
    path = tmp_path / "s" / "student.safetensors"
    state = load_file(path)
    name = next(iter(state))
    if damage == "extra":
        state["model.layers.9.self_attn.k_proj.weight"] = state[name].clone()
    elif damage == "missing":
        del state[name]
    elif damage == "shape":
        state[name] = torch.zeros(3, 3)
    if damage == "garbage":
        path.write_bytes(b"\x00" * 64)  # the checksum catches it
    else:  # a well-formed file of another model: its checksum made to agree, so the key check must catch it
        save_file(state, path)
        write_checksums(tmp_path / "s")
    with pytest.raises(ValueError, match=message):
        distill(factor_model(teacher, [2, 2, 2], method="svd")[0], teacher, stream, tmp_path / "s", cfg,
                log=lambda m: None)


def test_resume_with_a_fitting_state_continues(tmp_path, teacher):
    stream, cfg = _interrupted_run(tmp_path, teacher)
    res = distill(factor_model(teacher, [2, 2, 2], method="svd")[0], teacher, stream, tmp_path / "s", cfg,
                  log=lambda m: None)
    assert res["steps"] == 2


def test_recover_cli_trains_on_the_domain_and_records_precision(capsys, tmp_path, tiny_llama_dir,  # noqa: F811
                                                                monkeypatch):
    import mea.data

    asked = []

    def stub(tokenizer, domain="modern"):
        asked.append(domain)
        return torch.randint(0, len(tokenizer), (5000,))

    monkeypatch.setattr(mea.data, "training_tokens", stub)  # `mea recover` reads it from mea.data when it runs
    code, _, err = run(capsys, "compress", tiny_llama_dir, tmp_path / "c", "--virtual-heads", "2",
                       "--calib-windows", "4", "--calib-window", "64", "--fit-steps", "1", "--no-eval")
    assert code == 0, err
    code, res, err = run(capsys, "recover", tmp_path / "c", tmp_path / "r", "--teacher", tiny_llama_dir,
                         "--tokens", "1024", "--seq-len", "512", "--domain", "shakespeare", "--no-eval")
    assert code == 0, err
    assert asked == ["shakespeare"] and res["distill"]["steps"] == 2
    assert res["distill"]["precision"] == precision.name(precision.auto_dtype("cpu"))
    provenance = json.loads((tmp_path / "r" / "mea_provenance.json").read_text())
    assert provenance["recovery"]["config"]["retrieval_frac"] == 0.25
    code, _, err = run(capsys, "recover", tmp_path / "c", tmp_path / "r2", "--teacher", tiny_llama_dir,
                       "--retrieval-frac", "1.5", "--no-eval")
    assert code == 2 and "--retrieval-frac must be in [0, 1]" in err
