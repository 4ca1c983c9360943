"""Filters for mathematics: LaTeX sources and prose with equations.

Prose rules read equations as noise: `x^2 + 3x = 7` is four "words" without a letter-only word, no
stop word and no sentence end, so Gopher's alpha-word ratio and C4's line rules remove most math.
Here the equations (math spans, LaTeX commands and environments, equation lines) are set aside and
the rules judge the prose around them, plus the whole document's share of letters and digits (symbol
soup) and its repetition. Nothing is rewritten.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from megaqwen.data_pipeline.document import Document
from megaqwen.data_pipeline.steps.base import Step
from megaqwen.data_pipeline.steps.content import _MATH_SPAN, is_equation_line
from megaqwen.data_pipeline.steps.filters import GopherRepetition, GopherRepetitionConfig
from megaqwen.data_pipeline.steps.text import profile_for, words

_ENV_BLOCK = re.compile(r"\\begin\{(equation|align|gather|multline|eqnarray|array|matrix|[pbvB]?matrix|"
                        r"cases|tikzpicture|tabular)\*?\}.*?\\end\{\1\*?\}", re.DOTALL)
_COMMAND = re.compile(r"\\[A-Za-z]+\*?(\[[^\]]*\])?")


def prose_of(text: str) -> str:
    """`text` without math spans, LaTeX environments and commands, braces and equation lines."""
    t = _ENV_BLOCK.sub(" ", text)
    t = _MATH_SPAN.sub(" ", t)
    t = _COMMAND.sub(" ", t)
    t = t.replace("{", " ").replace("}", " ")
    return "\n".join(ln for ln in t.split("\n") if not is_equation_line(ln))


@dataclass
class MathQualityConfig:
    min_chars: int = 80
    """fewer non-blank characters: too short."""
    min_prose_words: int = 8
    """fewer words outside the equations: no explanation at all."""
    min_alnum_fraction: float = 0.4
    """share of letters and digits among non-blank characters below this: symbol soup."""
    min_stop_words: int = 1
    """fewer distinct stop words of the document's language in the prose part (when it has 30+ words)."""
    max_replacement_fraction: float = 0.01
    """share of U+FFFD replacement characters above this: undecodable bytes."""
    repetition: GopherRepetitionConfig | None = None
    """Gopher repetition thresholds for the whole document (None: the published defaults)."""


class MathQuality(Step):
    name = "math_quality"
    Config = MathQualityConfig

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self._repetition = GopherRepetition(self.cfg.repetition)

    def process(self, doc: Document) -> str | None:
        c = self.cfg
        text = doc.text
        visible = sum(not ch.isspace() for ch in text)
        if visible < c.min_chars:
            return "too_short"
        if text.count("\ufffd") / visible > c.max_replacement_fraction:
            return "replacement_chars"
        if sum(ch.isalnum() for ch in text) / visible < c.min_alnum_fraction:
            return "alnum_fraction"
        prof = profile_for(doc.metadata.get("language"), text)
        prose_text = prose_of(text)
        prose = words(prose_text, prof.cjk)
        if len(prose) < c.min_prose_words:
            return "too_few_prose_words"
        if prof.stop_words and len(prose) >= 30:
            lowered = {w.lower() for w in prose}
            if len(prof.stop_words & lowered) < c.min_stop_words:
                return "stop_words"
        # repetition of the prose: equations repeat their symbols ("= 0", "f(x)") by nature
        reason = self._repetition.process(Document(doc.id, prose_text, doc.metadata))
        return None if reason is None else f"repetition_{reason}"
