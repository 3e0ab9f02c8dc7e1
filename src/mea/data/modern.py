"""Modern English text from two Debian documentation packages, as prose documents.

- Calibration and recovery: the Python 3.11 documentation (`python3.11-doc`, its reStructuredText sources:
  tutorial, how-tos, FAQ, library and language reference, what's new), reduced to prose paragraphs.
- Held-out: the Debian Reference (`debian-reference-en`), its HTML paragraphs. A different source and
  subject from the calibration text, so a compressed model is judged outside the text it was fitted on.

`make setup` extracts both packages into `<venv>/share/mea-text` (`scripts/fetch_text.sh`, no root needed);
an installed system copy (`apt-get install python3.11-doc debian-reference-en`) works too, and `MEA_TEXT_DIR`
points elsewhere. No evaluation data set (BoolQ, LAMBADA, SciQ, ...) comes from these packages.
"""

from __future__ import annotations

import gzip
import html.parser
import os
import re
import sys
from functools import lru_cache
from pathlib import Path

PYTHON_DOC_SOURCES = Path("share/doc/python3.11/html/_sources")
DEBIAN_REFERENCE = Path("share/debian-reference")
PYTHON_DOC_SECTIONS = ("tutorial", "howto", "faq", "library", "reference", "using", "whatsnew")
MIN_PARAGRAPH_WORDS = 8  # shorter blocks are headings, captions and list fragments


def text_roots() -> list[Path]:
    """Where the extracted packages are looked for, in order."""
    roots = [Path(sys.prefix) / "share/mea-text/usr", Path("/usr")]
    if os.environ.get("MEA_TEXT_DIR"):
        roots.insert(0, Path(os.environ["MEA_TEXT_DIR"]) / "usr")
    return roots


def _find(relative: Path, package: str) -> Path:
    for root in text_roots():
        if (root / relative).is_dir():
            return root / relative
    raise ValueError(f"the modern-English text needs the Debian package '{package}': run `make setup` (it extracts it "
                     f"into {sys.prefix}/share/mea-text), or `apt-get install {package}`, or set MEA_TEXT_DIR to a "
                     f"folder holding its extracted usr/{relative}")


_ROLE = re.compile(r":[\w:.-]+:`[~!]*([^`<]*?)(?:\s*<[^>]*>)?`")   # :func:`abs` -> abs, :ref:`text <label>` -> text
_LITERAL = re.compile(r"``([^`]*)``")
_LINK = re.compile(r"`([^`<]*?)\s*<[^>]*>`_+")
_EMPHASIS = re.compile(r"(?<![\w*])\*{1,2}([^*\n]+?)\*{1,2}(?![\w*])")
_FOOTNOTE = re.compile(r"\s*\[#\w*\]_")


def rst_prose(text: str) -> str:
    """The prose paragraphs of a reST document: unindented blocks that are not directives, headings, tables,
    lists or code; inline markup reduced to its text."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if not lines or any(line[:1].isspace() for line in lines):
            continue  # indented: code, directive bodies, block quotes
        first = lines[0].lstrip()
        if first.startswith((".. ", "..\t", "|", "+", "=", "-", "*", "#", ">>>", ":")) or re.match(r"\d+\.\s", first):
            continue
        if len(lines) > 1 and re.fullmatch(r"([=\-~^\"'`#*+])\1+", lines[-1].strip()):
            continue  # a heading
        para = " ".join(line.strip() for line in lines)
        para = _FOOTNOTE.sub("", _EMPHASIS.sub(r"\1", _LINK.sub(r"\1", _LITERAL.sub(r"\1", _ROLE.sub(r"\1", para)))))
        if para.endswith("::"):
            para = para[:-1]  # "for example::" introduces a code block we dropped
        if len(para.split()) >= MIN_PARAGRAPH_WORDS:
            paragraphs.append(para)
    return "\n\n".join(paragraphs)


class _Paragraphs(html.parser.HTMLParser):
    """Text of every <p> element (DocBook HTML: prose; tables and listings are elsewhere)."""

    def __init__(self):
        super().__init__()
        self.depth, self.current, self.paragraphs = 0, [], []

    def handle_starttag(self, tag, attrs):
        if tag == "p":
            self.depth += 1

    def handle_endtag(self, tag):
        if tag == "p" and self.depth:
            self.depth -= 1
            para = " ".join("".join(self.current).split())
            if len(para.split()) >= MIN_PARAGRAPH_WORDS:
                self.paragraphs.append(para)
            self.current = []

    def handle_data(self, data):
        if self.depth:
            self.current.append(data)


def html_prose(text: str) -> str:
    parser = _Paragraphs()
    parser.feed(text)
    return "\n\n".join(parser.paragraphs)


@lru_cache(maxsize=1)
def python_doc_documents() -> tuple[tuple[str, str], ...]:
    """(name, prose) for every document of the chosen Python documentation sections, in a fixed order."""
    root = _find(PYTHON_DOC_SOURCES, "python3.11-doc")
    docs = []
    for section in PYTHON_DOC_SECTIONS:
        for f in sorted((root / section).glob("*.txt")):
            prose = rst_prose(f.read_text(encoding="utf-8", errors="replace"))
            if prose:
                docs.append((f"python3.11-doc/{section}/{f.stem}", prose))
    return tuple(docs)


@lru_cache(maxsize=1)
def debian_reference_documents() -> tuple[tuple[str, str], ...]:
    """(name, prose) for each chapter and appendix of the Debian Reference, in reading order."""
    root = _find(DEBIAN_REFERENCE, "debian-reference-en")
    files = sorted(root.glob("*.en.html"), key=lambda f: (not f.name.startswith("pr"), f.name.startswith("ap"), f.name))
    docs = []
    for f in files:
        if f.name.startswith("index"):
            continue
        raw = gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_bytes()
        prose = html_prose(raw.decode("utf-8", errors="replace"))
        if prose:
            docs.append((f"debian-reference/{f.name.split('.')[0]}", prose))
    return tuple(docs)
