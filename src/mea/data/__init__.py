from .corpus import (
    calibration_windows,
    corpus_dir,
    embedded_documents,
    heldout_text,
    probe_windows,
    read_documents,
    read_texts,
    token_windows,
    training_tokens,
)

__all__ = ["calibration_windows", "corpus_dir", "embedded_documents", "heldout_text", "probe_windows",
           "read_documents", "read_texts", "token_windows", "training_tokens"]
