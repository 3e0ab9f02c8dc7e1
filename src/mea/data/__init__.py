from .corpus import (
    DEFAULT_DOMAIN,
    DOMAINS,
    calibration_windows,
    corpus_dir,
    domain_documents,
    embedded_documents,
    heldout_text,
    probe_windows,
    read_documents,
    read_texts,
    token_windows,
    training_tokens,
)

__all__ = ["DEFAULT_DOMAIN", "DOMAINS", "calibration_windows", "corpus_dir", "domain_documents", "embedded_documents",
           "heldout_text", "probe_windows", "read_documents", "read_texts", "token_windows", "training_tokens"]
