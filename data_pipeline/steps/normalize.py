"""Unicode and whitespace normalisation (early: later rules count characters).

For every document (the documented normalisations code goes through as well):
- Unicode normal form `form` (NFC by default: composes "e" + U+0301 into "é"; NFC never changes
  ASCII, so ASCII source files are untouched);
- line endings: CRLF and lone CR become LF;
- removed: C0/C1 control characters other than tab, newline and form feed, zero-width characters
  (U+200B-U+200D, U+2060) and byte-order marks (U+FEFF).

Only for prose (content type from the `content_type` step, or classified here): runs of spaces, tabs
and no-break spaces inside a line become one space, lines are stripped, 3+ newlines become 2, and the
text is stripped. Code and math keep their indentation, trailing spaces and line structure exactly:
Python does not parse without its indentation, and Markdown / LaTeX line breaks carry meaning.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from megaqwen.data_pipeline.document import Document
from megaqwen.data_pipeline.steps.base import Step
from megaqwen.data_pipeline.steps.content import content_type

# C0/C1 control characters except tab, newline and form feed, plus zero-width and BOM characters
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]")
_CONTROL_PROSE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
_BLANK_LINES = re.compile(r"\n{3,}")


@dataclass
class NormalizeConfig:
    form: str = "NFC"
    """Unicode normal form (NFC keeps compatibility characters such as 'ﬁ'; NFKC folds them)."""
    min_chars: int = 1
    """documents with fewer non-whitespace characters after normalisation are removed as empty."""
    collapse_prose_whitespace: bool = True
    """collapse spaces and blank lines in prose (never in code or math)."""

    def __post_init__(self):
        if self.form not in ("NFC", "NFKC", "NFD", "NFKD", "none"):
            raise ValueError(f"normalize.form must be NFC, NFKC, NFD, NFKD or none, got {self.form!r}")


class Normalize(Step):
    name = "normalize"
    Config = NormalizeConfig

    def process(self, doc: Document) -> str | None:
        t = doc.text
        if self.cfg.form != "none" and not t.isascii():
            t = unicodedata.normalize(self.cfg.form, t)
        if "\r" in t:
            t = t.replace("\r\n", "\n").replace("\r", "\n")
        prose = self.cfg.collapse_prose_whitespace and content_type(doc) == "prose"
        t = (_CONTROL_PROSE if prose else _CONTROL).sub("", t)
        if prose:
            t = "\n".join(_SPACES.sub(" ", line).strip() for line in t.split("\n"))
            t = _BLANK_LINES.sub("\n\n", t).strip()
        if t != doc.text:
            doc.text = t
        if len(t.strip()) < self.cfg.min_chars:
            return "empty"
        return None
