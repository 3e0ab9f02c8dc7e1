"""`mea recover`: recovery training of a compressed checkpoint toward its uncompressed teacher."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from ..checkpoint import check_output_dir, load_causal_lm, save_atomic
from ..convert import load_source, to_mea
from ..data import calibration_windows, heldout_text, read_texts, token_windows, training_tokens
from ..eval import perplexity
from ..models import MEAForCausalLM
from .recover import DistillConfig, distill, layerwise_fit


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def recover(src: str, out: str, *, teacher: str, cfg: DistillConfig, layerwise_steps: int = 0,
            text: list[str] | None = None, evaluate: bool = True, overwrite: bool = False) -> dict:
    check_output_dir(out, overwrite=overwrite)
    cfg.check()
    if cfg.tokens < cfg.batch * cfg.seq_len and layerwise_steps == 0:
        raise ValueError("nothing to do: --tokens is below one step and --layerwise-steps is 0")
    t0 = time.perf_counter()
    student = load_causal_lm(src)
    if not isinstance(student, MEAForCausalLM):
        raise ValueError(f"{src} is a {type(student).__name__}; recover expects a compressed MEA checkpoint")
    teacher_source = load_source(teacher, tokenizer_for="recovery (training text)")
    tok = teacher_source.tokenizer
    teacher_model = to_mea(teacher_source.model)
    if teacher_model.config.vocab_size != student.config.vocab_size:
        raise ValueError(f"teacher vocabulary ({teacher_model.config.vocab_size}) differs from the student's "
                         f"({student.config.vocab_size}); recover from the model it was compressed from")
    report = {"src": src, "teacher": teacher_source.description}
    held = (token_windows(tok, heldout_text(cfg.domain), window=1024, count=8, what="held-out text") if evaluate
            else None)
    report["heldout"] = f"{cfg.domain} held-out text (mea.data.heldout_text)" if evaluate else None
    if evaluate:
        report["ppl_before"] = perplexity(student, held)["ppl"]
    if layerwise_steps:
        report["layerwise"] = layerwise_fit(student, teacher_model, calibration_windows(tok, window=512, count=16),
                                            steps=layerwise_steps, log=log)
    if cfg.tokens >= cfg.batch * cfg.seq_len:
        stream = (tok(read_texts(text), add_special_tokens=False, return_tensors="pt").input_ids[0] if text
                  else training_tokens(tok, domain=cfg.domain))
        state_dir = Path(f"{out}.state")
        report["distill"] = distill(student, teacher_model, stream, state_dir, cfg, tokenizer=tok, log=log)
    provenance_file = Path(src) / "mea_provenance.json"
    provenance = json.loads(provenance_file.read_text()) if provenance_file.exists() else {}
    provenance["recovery"] = {**report, "config": vars(cfg), "layerwise_steps": layerwise_steps,
                              "text": text or f"{cfg.domain} calibration documents", "command": " ".join(sys.argv)}
    if evaluate:
        report["ppl_after"] = perplexity(student, held)["ppl"]
    save_atomic(student, out, tokenizer=tok, overwrite=overwrite, extra_json={"mea_provenance.json": provenance})
    shutil.rmtree(f"{out}.state", ignore_errors=True)
    report["out"] = out
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report
