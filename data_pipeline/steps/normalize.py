"""Unicode and whitespace normalisation (always the first step: later rules count characters)."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from megaqwen.data_pipeline.document import Document
from megaqwen.data_pipeline.steps.base import Step

# C0/C1 control characters except tab and newline, plus zero-width and BOM characters
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
_BLANK_LINES = re.compile(r"\n{3,}")


@dataclass
class NormalizeConfig:
    form: str = "NFC"
    """Unicode normal form (NFC keeps compatibility characters such as 'ﬁ'; NFKC folds them)."""
    min_chars: int = 1
    """documents shorter than this after normalisation are removed as empty."""


class Normalize(Step):
    name = "normalize"
    Config = NormalizeConfig

    def process(self, doc: Document) -> str | None:
        t = unicodedata.normalize(self.cfg.form, doc.text).replace("\r\n", "\n").replace("\r", "\n")
        t = _CONTROL.sub("", t)
        t = "\n".join(_SPACES.sub(" ", line).strip() for line in t.split("\n"))
        t = _BLANK_LINES.sub("\n\n", t).strip()
        doc.text = t
        return "empty" if len(t) < self.cfg.min_chars else None
