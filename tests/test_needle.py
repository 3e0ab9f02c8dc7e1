"""Needle in a haystack: the real SmolLM2 finds a planted number on a short context (and cannot name
one that was never planted); a random model does not; the heatmap is written."""

import json

import pytest
import torch

import mea
from helpers import tiny_config
from mea.convert import load_source
from mea.eval.needle import build_prompt, haystack_ids, needle_grid
from mea.eval.protocol import CacheSystem, answer_from_cache


@pytest.fixture(scope="module")
def smollm2():
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return load_source("smollm2")


def test_smollm2_finds_the_planted_needle_only(smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    result = needle_grid(model, tok, lengths=[256], depths=[0.0, 0.5, 1.0], trials=2, seed=1)
    assert all(c["accuracy"] == 1.0 for c in result["cells"])
    hay = haystack_ids(tok)
    context, question, _ = build_prompt(tok, hay, length=256, depth=0.5, number="48151", offset=5000)
    *_, other = build_prompt(tok, hay, length=256, depth=0.5, number="62342", offset=5000)
    r = answer_from_cache(model, CacheSystem(), context, question, other)  # ask for a number not in the text
    assert not r["found"] and r["logprob"] < -1.0


def test_random_model_fails_and_cli_writes_heatmap(smollm2, tmp_path, monkeypatch):
    random_model = mea.MEAForCausalLM(tiny_config(vocab_size=len(smollm2.tokenizer), max_position_embeddings=512))
    result = needle_grid(random_model, smollm2.tokenizer, lengths=[128], depths=[0.5], trials=2)
    assert result["cells"][0]["accuracy"] == 0.0
    with pytest.raises(ValueError, match="max_position_embeddings"):
        needle_grid(random_model, smollm2.tokenizer, lengths=[1024], depths=[0.5])
    with pytest.raises(ValueError, match="too short"):
        needle_grid(random_model, smollm2.tokenizer, lengths=[20], depths=[0.5])

    from mea import cli

    monkeypatch.setattr("mea.convert.load_source", lambda src, **kw: smollm2)
    assert cli.main(["eval", "needle", "smollm2", str(tmp_path / "n"), "--lengths", "128", "--depths", "0", "1",
                     "--trials", "1"]) == 0
    saved = json.loads((tmp_path / "n" / "needle.json").read_text())
    assert len(saved["cells"]) == 2 and (tmp_path / "n" / "needle.png").stat().st_size > 0
