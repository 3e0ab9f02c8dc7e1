"""Text domains: the modern-English text is prose, and no held-out text reaches calibration or recovery."""

import pytest
from helpers import byte_tokenizer

from mea.data import DOMAINS, calibration_windows, domain_documents, heldout_text, probe_windows
from mea.data.modern import html_prose, rst_prose


def test_rst_prose_keeps_paragraphs_and_drops_code_headings_and_markup():
    text = """Scopes
======

A *namespace* is a mapping from names to objects, see :func:`abs` and ``z.real`` for an example of it::

   >>> x = 1

.. note::

   Directive bodies are not prose.

- a list item is not a paragraph of running text either
"""
    assert rst_prose(text) == "A namespace is a mapping from names to objects, see abs and z.real for an example of it:"


def test_html_prose_reads_paragraphs_only():
    page = "<h1>Title words are not read here at all</h1><p>The Debian archive is offered by many <b>remote</b>\n" \
           "mirror sites for access.</p><pre>apt-get install foo bar baz qux quux corge</pre><p>Too short.</p>"
    assert html_prose(page) == "The Debian archive is offered by many remote mirror sites for access."


@pytest.mark.parametrize("domain", DOMAINS)
def test_heldout_never_overlaps_calibration(domain):
    calibration = "\n".join(text for _, text in domain_documents(domain, "calibration"))
    held = [p for p in heldout_text(domain).split("\n\n") if len(p) > 200]
    assert len(held) > 20
    assert not [p for p in held if p in calibration]


def test_modern_domain_is_large_enough_and_windows_are_disjoint():
    tok = byte_tokenizer()
    assert len(heldout_text("modern")) > 200_000 and len(domain_documents("modern", "calibration")) > 100
    calib = calibration_windows(tok, window=64, count=8)
    probe = probe_windows(tok, window=64, count=4)
    rows = {tuple(r.tolist()) for r in calib}
    assert len(rows) == 8 and not rows & {tuple(r.tolist()) for r in probe}


def test_unknown_domain_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown text domain 'wiki'"):
        heldout_text("wiki")
