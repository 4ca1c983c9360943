"""Web junk the published quality rules let through (rules of our own, measured in RESULTS.md):

- shouting pages: Gopher / C4 / FineWeb judge words and lines, not case, so an all-capitals page of
  sales copy passes all of them. Removed when capitals are more than `max_uppercase_fraction` of
  its letters (scripts without case, such as Chinese, have no capitals and are never removed);
- cookie / consent / JavaScript notices: C4 drops such *lines*, but a page that is mostly notices
  keeps its remaining lines. Removed when those lines hold `max_boilerplate_fraction` of its
  characters or more.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from megaqwen.data_pipeline.document import Document
from megaqwen.data_pipeline.steps.base import Step

BOILERPLATE = re.compile(
    r"\b((use|uses|using|accept|store|set|sets|our|third[- ]party|essential|necessary|analytics) cookies|"
    r"cookie (policy|settings|preferences|consent|banner|notice)|(your|give|withdraw) consent|"
    r"consent (preferences|settings|choices|manager)|(enable|enabled|disabled|requires?|turn on) javascript|"
    r"javascript (is )?(disabled|required|must be enabled|is not enabled)|js is disabled|enable js|"
    r"browser (is )?(not supported|out of date)|privacy (policy|settings|preferences)|"
    r"terms (of (use|service)|and conditions)|accept all|reject all|manage (preferences|options|settings)|"
    r"(gdpr|ccpa)\b|tracking technolog|personali[sz]ed ads|our partners|legitimate interest|"
    r"all rights reserved|subscribe to our newsletter|sign up for our newsletter|log ?in to continue|"
    r"skip to (main )?content|please wait while|checking your browser|are you a robot|captcha)",
    re.IGNORECASE,
)


def boilerplate_fraction(text: str) -> float:
    """Share of the non-blank characters in lines that carry a notice phrase."""
    total = bad = 0
    for line in text.split("\n"):
        n = len(line.strip())
        total += n
        if n and BOILERPLATE.search(line):
            bad += n
    return bad / max(total, 1)


def uppercase_fraction(text: str) -> tuple[float, int]:
    """(capitals / cased letters, cased letters)."""
    upper = lower = 0
    for ch in text:
        if ch.isupper():
            upper += 1
        elif ch.islower():
            lower += 1
    cased = upper + lower
    return upper / max(cased, 1), cased


@dataclass
class WebJunkConfig:
    max_uppercase_fraction: float = 0.5
    """remove when capitals are more than this share of the cased letters (English prose: ~3-5 %)."""
    min_cased_letters: int = 50
    """the capitals rule judges only pages with at least this many cased letters."""
    max_boilerplate_fraction: float = 0.4
    """remove when lines with cookie / consent / JavaScript / paywall notices hold this share of the
    characters or more."""


class WebJunk(Step):
    name = "web_junk"
    Config = WebJunkConfig

    def process(self, doc: Document) -> str | None:
        c = self.cfg
        upper, cased = uppercase_fraction(doc.text)
        if cased >= c.min_cased_letters and upper > c.max_uppercase_fraction:
            return "uppercase"
        if boilerplate_fraction(doc.text) >= c.max_boilerplate_fraction:
            return "boilerplate"
        return None
