"""Language identification with `langid` (PyPI; its model ships inside the wheel, so it runs offline)."""

from __future__ import annotations

from dataclasses import dataclass, field

from megaqwen.data_pipeline.document import Document
from megaqwen.data_pipeline.steps.base import Step

_IDENTIFIER = None  # one per process: loading the model takes ~0.5 s


def _identifier():
    global _IDENTIFIER
    if _IDENTIFIER is None:
        from langid.langid import LanguageIdentifier, model

        _IDENTIFIER = LanguageIdentifier.from_modelstring(model, norm_probs=True)
    return _IDENTIFIER


@dataclass
class LangIdConfig:
    languages: list[str] = field(default_factory=lambda: ["en"])
    """ISO 639-1 codes to keep."""
    min_score: float = 0.65
    """minimum probability of the top language (FineWeb keeps English above 0.65)."""
    max_chars: int = 2000
    """only the first N characters are classified: enough for a stable answer, bounded cost."""


class LanguageId(Step):
    name = "langid"
    Config = LangIdConfig

    def process(self, doc: Document) -> str | None:
        lang, prob = _identifier().classify(doc.text[: self.cfg.max_chars])
        doc.metadata["language"] = lang
        doc.metadata["language_score"] = round(float(prob), 4)
        if lang not in self.cfg.languages:
            return f"language_{lang}"
        if prob < self.cfg.min_score:
            return "language_low_confidence"
        return None
