"""The frontier measures: answers come from the stored cache, bytes held match a hand count, planted
facts are retrievable only through the cache, and the whole study runs end to end on a tiny model."""

import json
import random
import sys

import pytest
import torch

from mea.eval import cached_measures as cm
from mea.eval.peers import cache_system
from mea.eval.protocol import CacheSystem, answer_from_cache, greedy_from_cache, prefill

TEXT = " ".join(f"the {w} of line {i} is plain text about {v}." for i, (w, v) in
                enumerate(zip(["cat", "dog", "sun", "sea", "map", "key"] * 200, ["rain", "code", "ships", "ink"] * 300)))


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([TEXT, "Question: what is the code for ? Answer: 0123456789 The secret number magician"],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def tiny_llama(vocab: int, heads: int = 2, kv_heads: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=128,  # head_dim 64 (quanto's group size)
                      num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    return tiny_llama(len(tok)), tok


def test_question_is_read_through_the_stored_cache(tiny):
    model, _ = tiny
    ids = torch.randint(3, 300, (40,))
    context, question, answer = ids[:30], ids[30:34], ids[34:]
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        r = answer_from_cache(model, CacheSystem(), context, question, answer)
    finally:
        hook.remove()
    assert calls == [30, 4 + 6 - 1]  # one prefill of the context, then question + answer from the cache
    with torch.no_grad():  # reference: one uncached forward over everything
        logits = model(ids[None], use_cache=False).logits[0, 33:39].float()
    ref = torch.log_softmax(logits, -1).gather(-1, answer[:, None]).mean().item()
    assert r["logprob"] == pytest.approx(ref, abs=1e-4)

    # what the cache holds is what answers: damage the stored values and the answer changes
    def damaged(m):
        from transformers import DynamicCache

        class Damaged(DynamicCache):
            def update(self, k, v, layer_idx, *a, **kw):
                if k.shape[-2] == 30:  # the prefill: store zeroed values
                    v = torch.zeros_like(v)
                return super().update(k, v, layer_idx, *a, **kw)

        return Damaged()

    hurt = answer_from_cache(model, CacheSystem("damaged", new_cache=damaged), context, question, answer)
    assert abs(hurt["logprob"] - r["logprob"]) > 1e-3


def test_greedy_from_cache_matches_generate(tiny):
    model, tok = tiny
    prompt = torch.randint(3, 300, (12,))
    ours = greedy_from_cache(model, CacheSystem(), prompt, max_new_tokens=6)
    ref = model.generate(prompt[None], attention_mask=torch.ones(1, 12, dtype=torch.long), max_new_tokens=6,
                         do_sample=False, min_new_tokens=6)[0, 12:].tolist()
    assert ours == ref


def test_bytes_held_match_a_hand_count(tiny):
    model, _ = tiny
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    ctx = torch.randint(3, 300, (256,))
    plain = prefill(model, CacheSystem(), ctx)
    assert plain.kv_bytes == cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 256 * 4
    # 4-bit quanto: packed codes (2 per byte) plus a float32 scale and shift per group of 64 values
    q = prefill(model, cache_system("quanto-4"), ctx)
    numel = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 256
    assert q.kv_bytes == numel // 2 + 2 * (numel // 64) * 4
    # an MEA cache holds h' component heads (and the k-scales when QK-norm applies)
    import mea
    from helpers import tiny_config

    m = mea.MEAForCausalLM(tiny_config(mea_num_component_heads=1)).eval()
    state = prefill(m, CacheSystem(), torch.randint(1, 97, (50,)))
    assert state.kv_bytes == 50 * m.config.kv_cache_bytes_per_token(bytes_per_element=4)


def test_multikey_prompt_plants_every_fact_and_asks_one(tiny):
    _, tok = tiny
    hay = tok(TEXT, return_tensors="pt").input_ids[0]
    context, question, answer, depth = cm.multikey_prompt(tok, hay, length=400, keys=4, rng=random.Random(3))
    assert context.numel() + question.numel() + answer.numel() == 400 and 0 <= depth <= 1
    text, asked = tok.decode(context), tok.decode(question)
    assert text.count("The code for") == 4
    name = asked.split("code for ")[1].split("?")[0]
    assert f"The code for {name} is{tok.decode(answer)}." in text
    with pytest.raises(ValueError, match="too short"):
        cm.multikey_prompt(tok, hay, length=60, keys=4, rng=random.Random(0))


def test_cached_perplexity_equals_uncached_for_a_full_cache(tiny):
    model, _ = tiny
    windows = torch.randint(3, 300, (2, 64))
    r = cm.cached_perplexity(model, CacheSystem(), windows, prefix=20, chunk=16)
    with torch.no_grad():
        logits = model(windows, use_cache=False).logits[:, 20:-1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 21:].reshape(-1))
    assert r["tokens"] == 2 * 43 and r["nll"] == pytest.approx(nll.item(), abs=1e-4)
    with pytest.raises(ValueError, match="prefix"):
        cm.cached_perplexity(model, CacheSystem(), windows, prefix=63, chunk=16)


def test_cache_system_names():
    assert cache_system("hqq-2").name == "hqq-2"
    for bad in ("quanto-3", "kvpress-foo-0.5", "kvpress-snapkv-1.5", "zip"):
        with pytest.raises(ValueError, match="cache system"):
            cache_system(bad)


def test_a_press_with_a_scoring_window_keeps_shorter_contexts_whole(monkeypatch):
    import contextlib
    import types

    entered = []

    class SnapKVPress:  # kvpress's interface: an instance called on the model is a context manager
        window_size = 64

        def __init__(self, compression_ratio):
            self.compression_ratio = compression_ratio

        @contextlib.contextmanager
        def __call__(self, model):
            entered.append(self.compression_ratio)
            yield

    monkeypatch.setitem(sys.modules, "kvpress", types.SimpleNamespace(SnapKVPress=SnapKVPress))
    system = cache_system("kvpress-snapkv-0.5")
    for tokens in (64, 65):
        with system.during_prefill(None, tokens):
            pass
    assert entered == [0.5]  # pruned only the 65-token context


def test_frontier_end_to_end_on_a_tiny_model(tiny, tmp_path, monkeypatch):
    from mea.experiments.frontier import run_frontier
    from mea.experiments.frontier_measure import Sizes

    model, tok = tiny
    src = tmp_path / "tiny"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    monkeypatch.setattr("mea.data.heldout_text", lambda domain="shakespeare": TEXT)  # tiny held-out text
    sizes = Sizes(bytes_context=128, ppl_windows=1, ppl_window=96, ppl_prefix=48, ppl_chunk=16, lambada=3,
                  needle_lengths=(128,), needle_depths=(0.0, 1.0), needle_trials=1, multikey_lengths=(160,),
                  multikey_keys=2, multikey_trials=2, chat_tokens=4)
    out = tmp_path / "out"
    result = run_frontier(out, src=str(src), levels=[0.5], methods=["svd"], quant=["quanto-4"], presses=[],
                          sizes=sizes, log=lambda m: None)
    assert result["systems"] == ["original", "quanto-4", "mea-svd-0.5-free", "mea-svd-0.5-fit"]
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["name"]: r for r in summary["rows"]}
    assert rows["original"]["kv_fraction"] == 1.0
    assert rows["mea-svd-0.5-free"]["kv_fraction"] == pytest.approx(0.5, abs=0.02)
    assert rows["quanto-4"]["kv_fraction"] < 0.5
    assert rows["original"]["measures"]["lambada"]["n"] == 3
    measured = json.loads((out / "systems" / "mea-svd-0.5-fit.ppl_modern.json").read_text())
    assert measured["placement"]["device"] == "cpu" and measured["placement"]["precision"] == "fp32"  # the default
    md = (out / "report.md").read_text()
    assert "| mea-svd-0.5-free | MEA svd (training-free) |" in md and "## Fixed chat prompts" in md
    assert (out / "frontier.png").stat().st_size > 0
    before = (out / "systems" / "original.lambada.json").stat().st_mtime_ns
    run_frontier(out, src=str(src), levels=[0.5], methods=["svd"], quant=["quanto-4"], presses=[], sizes=sizes,
                 log=lambda m: None)  # resumes: nothing re-run
    assert (out / "systems" / "original.lambada.json").stat().st_mtime_ns == before
    # a model made elsewhere joins the frontier, held to the targets of the KV fraction it keeps
    mine = {"mine-s0": str(out / "models" / "svd-0.5-fit")}
    run_frontier(out, src=str(src), levels=[0.5], methods=["svd"], quant=[], presses=[], sizes=sizes, models=mine,
                 only=["mea-mine-*"], log=lambda m: None)
    rows = {r["name"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert rows["mea-mine-s0"]["family"] == "MEA mine" and rows["mea-mine-s0"]["level"] == 0.5
    assert rows["mea-mine-s0"]["targets"]["ppl_modern"]["target"] == 1.15
    with pytest.raises(ValueError, match="no config.json"):
        run_frontier(out, src=str(src), levels=[0.5], methods=["svd"], quant=[], presses=[], sizes=sizes,
                     models={"gone": str(tmp_path / "nowhere")}, only=["mea-gone"], log=lambda m: None)


def test_planted_text_never_overlaps_calibration_or_recovery_text():
    """Needle and multi-key contexts are cut from the modern held-out text (the Debian Reference); none of it
    appears in the modern calibration/recovery documents (the Python documentation)."""
    from mea.data import domain_documents, heldout_text
    from mea.experiments import frontier_measure

    held = heldout_text("modern")
    calibration = "\n".join(text for _, text in domain_documents("modern", "calibration"))
    rng = random.Random(0)
    snippets = [held[i : i + 80] for i in (rng.randrange(len(held) - 80) for _ in range(300))]
    assert not [s for s in snippets if s in calibration]

    class Tok:  # records which text the haystack is tokenized from
        def __call__(self, text, **kw):
            self.text = text
            return type("Ids", (), {"input_ids": torch.zeros(1, 3, dtype=torch.long)})()

    tok = Tok()
    frontier_measure.heldout_ids(tok, "modern")
    assert tok.text == held


def test_study_processes_claim_systems_and_take_over_dead_claims(tmp_path):
    from mea.experiments.frontier import _claim, level_args

    lock = tmp_path / "x.lock"
    with _claim(lock) as first:
        with _claim(lock) as second:  # held by a live process (this one): not taken
            assert first and not second
    assert not lock.exists()
    lock.write_text("999999999")  # left by a process that no longer exists
    with _claim(lock) as mine:
        assert mine and lock.read_text() != "999999999"
    assert level_args(0.67, 3) == ["--virtual-heads", "2"] and level_args(0.5, 3) == ["--kv-budget", "0.5"]
    with pytest.raises(ValueError, match="KV levels"):
        level_args(1.5, 3)
    # latent widths need no whole heads; every layer the same budget (the probe's sizes are models of their own)
    assert level_args(0.67, 3, "rope-pair-latent") == ["--kv-budget", "0.67", "--allocate", "errors"]


def test_plan_recovers_each_seed_from_the_fitted_model(tmp_path):
    from mea.experiments.frontier import plan

    steps, systems = plan("src", tmp_path, heads=3, levels=[0.5], methods=["svd"], quant=["hqq-4"], presses=[],
                          recover_tokens=(4096, 8192), peers_python=None, recover_seeds=(0, 1),
                          recover_recipes=[("rec", "--lr 3e-4")], kv_bits=[4])
    built = {target.name: cmd[cmd.index("-m") + 2:] for target, cmd in steps}
    # the first budget keeps the plain name; a further one is a longer run named by its size
    assert list(built) == ["svd-0.5-free", "svd-0.5-fit", "svd-0.5-rec-s0", "svd-0.5-rec-s1", "svd-0.5-rec8k-s0",
                           "svd-0.5-rec8k-s1"]
    assert built["svd-0.5-rec8k-s1"][built["svd-0.5-rec8k-s1"].index("--tokens") + 1] == "8192"
    assert "--recover" in built["svd-0.5-free"] and "--recover" not in built["svd-0.5-fit"]
    assert built["svd-0.5-rec-s1"][:2] == ["recover", str(tmp_path / "models" / "svd-0.5-fit")]
    assert built["svd-0.5-rec-s1"][-5:] == ["--seed", "1", "--lr", "3e-4", "--no-eval"]
    names = [s.name for s in systems]
    assert names[-11:-7] == ["mea-svd-0.5-rec-s0", "mea-svd-0.5-rec-s1", "mea-svd-0.5-rec8k-s0", "mea-svd-0.5-rec8k-s1"]
    # our quantized cache on the original and on every MEA model, never on another cache system (hqq-4)
    assert names[-7:] == ["original+int4", "mea-svd-0.5-free+int4", "mea-svd-0.5-fit+int4", "mea-svd-0.5-rec-s0+int4",
                          "mea-svd-0.5-rec-s1+int4", "mea-svd-0.5-rec8k-s0+int4", "mea-svd-0.5-rec8k-s1+int4"]
    assert {s.cache for s in systems[-7:]} == {"mea-kv4"}


def test_plan_builds_probe_allocated_models_beside_the_default(tmp_path):
    from mea.experiments.frontier import plan, recipes

    steps, systems = plan("src", tmp_path, heads=3, levels=[0.67], methods=["rope-pair-latent"], quant=[], presses=[],
                          recover_tokens=(4096,), peers_python=None, probe_objectives=("both",))
    built = {target.name: cmd[cmd.index("-m") + 2:] for target, cmd in steps}
    assert list(built) == ["rope-pair-latent-0.67-free", "rope-pair-latent-0.67-fit", "rope-pair-latent-0.67-rec-s0",
                           "rope-pair-latent-0.67-probe-both-free", "rope-pair-latent-0.67-probe-both-fit",
                           "rope-pair-latent-0.67-probe-both-rec-s0"]
    fit = built["rope-pair-latent-0.67-probe-both-fit"]
    assert fit[fit.index("--kv-budget") + 1] == "0.67" and fit[fit.index("--allocate") + 1] == "probe"
    assert fit[fit.index("--probe-objective") + 1] == "both"
    uniform = built["rope-pair-latent-0.67-fit"]
    assert uniform[uniform.index("--allocate") + 1] == "errors"
    assert built["rope-pair-latent-0.67-probe-both-rec-s0"][1] == str(tmp_path / "models" /
                                                                     "rope-pair-latent-0.67-probe-both-fit")
    family = {s.name: s.family for s in systems}
    assert family["mea-rope-pair-latent-0.67-probe-both-rec-s0"] == "MEA rope-pair-latent, both probe (recovered)"
    # a recipe of other recovery flags gets models of its own name
    steps, systems = plan("src", tmp_path, heads=3, levels=[0.67], methods=["svd"], quant=[], presses=[],
                          recover_tokens=(4096, 8192), peers_python=None,
                          recover_recipes=recipes(["rec", "rec-all"], ["--lr 3e-4", "--train all"]))
    built = {target.name: cmd[cmd.index("-m") + 2:] for target, cmd in steps}
    assert list(built)[2:] == ["svd-0.67-rec-s0", "svd-0.67-rec8k-s0", "svd-0.67-rec-all-s0", "svd-0.67-rec-all8k-s0"]
    assert built["svd-0.67-rec-s0"][-3:] == ["--lr", "3e-4", "--no-eval"]
    assert built["svd-0.67-rec-all-s0"][-3:] == ["--train", "all", "--no-eval"]
    assert {s.name: s.family for s in systems}["mea-svd-0.67-rec-all8k-s0"] == "MEA svd (recovered by rec-all, 8192 tokens)"
    with pytest.raises(ValueError, match="one distinct name per"):
        recipes(["a"], ["--x", "--y"])


def test_models_made_elsewhere_are_systems_of_their_own(tmp_path):
    from mea.experiments.frontier import parse_models, plan

    models = parse_models(["floor-0.5-rec-s0=out/a", "floor-0.5-rec-s1=out/b"])
    steps, systems = plan("src", tmp_path, heads=3, levels=[], methods=[], quant=[], presses=[], peers_python=None,
                          kv_bits=(4,), models=models)
    assert steps == []  # the study builds none of them
    by_name = {s.name: s for s in systems}
    assert by_name["mea-floor-0.5-rec-s1"].model == "out/b" and by_name["mea-floor-0.5-rec-s1"].level == "bytes"
    assert {by_name[f"mea-floor-0.5-rec-s{i}"].family for i in (0, 1)} == {"MEA floor-0.5-rec"}  # one plot line
    assert by_name["mea-floor-0.5-rec-s0+int4"].cache == "mea-kv4"
    for bad in (["noequals"], ["=dir"], ["a=x", "a=y"]):
        with pytest.raises(ValueError, match="distinct NAME=DIR"):
            parse_models(bad)


def test_target_checks_compare_with_the_original():
    from mea.experiments.frontier_report import target_checks

    def row(ppl, lam, found, level=None):
        cells = [{"length": 512, "depth": d, "accuracy": a} for d, a in zip((0.0, 0.5, 1.0), found)]
        return {"level": level, "measures": {"ppl_modern": {"ppl": ppl}, "lambada": {"value": lam},
                                             "needle": {"cells": cells}}}

    original = row(20.0, 0.40, (1.0, 2 / 3, 0.0))
    checks = target_checks(row(20.8, 0.37, (1.0, 1 / 3, 1.0), level=0.67), original)
    assert checks["ppl_modern"]["met"] and checks["ppl_modern"]["ratio"] == pytest.approx(1.04)
    assert checks["lambada"]["met"] and checks["lambada"]["ratio"] == pytest.approx(0.925)
    assert checks["needle"] == {"share": 0.5, "cells": 2, "target": 1.0, "met": False}  # lost the 0.5-depth cell
    assert not target_checks(row(23.5, 0.30, (1.0, 1.0, 1.0), level=0.5), original)["ppl_modern"]["met"]
    assert target_checks(original, original) is None  # no level, no targets


def test_plot_takes_seeds_that_share_a_kv_fraction(tmp_path):
    from mea.experiments.frontier_report import _plot

    def row(name, ppl, value):
        return {"name": name, "family": "MEA x (recovered)", "kv_fraction": 0.5,
                "measures": {"ppl_modern": {"ppl": ppl}, "lambada": {"value": value, "ci95": [value - 0.1, 1.0]}}}

    _plot(tmp_path / "f.png", [row("s0", 30.0, 0.2), row("s1", 31.0, 0.3)])
    assert (tmp_path / "f.png").stat().st_size > 0


def test_only_builds_the_models_its_systems_read(tmp_path):
    from mea.experiments.frontier import needed_steps, plan

    steps, systems = plan("src", tmp_path, heads=3, levels=[0.67, 0.5], methods=["svd"], quant=[], presses=[],
                          recover_tokens=(4096,), peers_python=None, recover_seeds=(0,))
    model = {s.name: s.model for s in systems}
    built = [t.name for t, _ in needed_steps(steps, {model["mea-svd-0.5-free"]})]
    assert built == ["svd-0.5-free"]
    built = [t.name for t, _ in needed_steps(steps, {model["mea-svd-0.5-rec-s0"], model["original"]})]
    assert built == ["svd-0.5-fit", "svd-0.5-rec-s0"]  # the recovery reads the fitted model


def test_stacked_mea_is_compared_with_2bit_caches_holding_no_fewer_bytes():
    from mea.experiments.frontier_report import _stacked_vs_2bit, stacked_vs_2bit

    def row(name, family, nbytes, ppl, lambada):
        return {"name": name, "family": family, "kv_bytes_per_token": nbytes,
                "measures": {"ppl_modern": {"ppl": ppl}, "lambada": {"value": lambada, "ci95": [lambada - 0.02,
                                                                                                   lambada + 0.02]}}}

    ours = row("mea-x-0.33-rec-s0+int4", "MEA x (recovered) + int4 cache", 2160, 44.0, 0.04)
    quanto = row("quanto-2", "quanto (QuantizedCache)", 4320, 151.0, 0.05)
    cmp = stacked_vs_2bit(ours, quanto)
    assert cmp["ppl_modern"]["better"] and not cmp["ppl_modern"]["overlap"]
    assert not cmp["lambada"]["better"] and cmp["lambada"]["overlap"]  # 0.04 vs 0.05, intervals overlap
    big = row("mea-x-0.67-rec-s0+int4", "MEA x (recovered) + int4 cache", 8000, 30.0, 0.14)
    lines = _stacked_vs_2bit([ours, big, quanto, row("quanto-4", "quanto (QuantizedCache)", 7200, 23.5, 0.27)])
    table = [line for line in lines if line.startswith("| mea-")]
    assert len(table) == 1 and "| quanto-2 |" in table[0] and table[0].endswith("| 1 of 2 measured |")
    assert "Target" not in "\n".join(lines)  # no original: no 16-bit reference


def test_stacked_target_needs_an_eighth_of_16_bits_and_every_measure():
    from mea.experiments.frontier_report import PLOTTED, _stacked_vs_2bit, sixteen_bit_bytes

    def row(name, family, nbytes, good, precision=None):
        proportion = {"value": 0.3, "ci95": [0.2, 0.4]} if good else {"value": 0.0, "ci95": [0.0, 0.05]}
        measures = {m: {"ppl": 30.0 if good else 200.0} if m.startswith("ppl_") else proportion for m, _ in PLOTTED}
        return {"name": name, "family": family, "kv_bytes_per_token": nbytes, "measures": measures,
                "precision": precision}

    original = row("original", "original", 46080, True, precision="fp32")
    assert sixteen_bit_bytes([original]) == 23040  # an fp32 study's original, at 16 bits
    two_bit = row("quanto-2", "quanto (QuantizedCache)", 4320, False)
    eighth = row("mea-a+int4", "MEA a + int4 cache", 2880, True)  # exactly 1/8, better on all five
    partial = row("mea-b+int4", "MEA b + int4 cache", 2000, True)
    del partial["measures"]["lambada"]  # fewer measures never meet the target
    over = row("mea-c+int4", "MEA c + int4 cache", 3240, True)  # better, but above 1/8
    lines = _stacked_vs_2bit([original, two_bit, eighth, partial, over])
    assert "| mea-a+int4 | 2880 | 0.125 |" in "\n".join(lines)
    assert lines[-1] == ("Target: at 1/8 of a 16-bit cache or less (2880 bytes a token), better than every 2-bit cache "
                         "on all 5 measures: met by mea-a+int4 (2 such system(s) measured).")


def test_an_empty_chat_answer_is_named_not_left_blank():
    from mea.experiments.frontier_report import EMPTY_ANSWER, _chat

    def row(name, answer):
        return {"name": name, "measures": {"chat": {"answers": [{"prompt": "Hi?", "answer": answer}]}}}

    lines = _chat([row("original", "Hello | there"), row("mea-x", "")])
    assert "| original | Hello \\| there |" in lines and f"| mea-x | {EMPTY_ANSWER} |" in lines
