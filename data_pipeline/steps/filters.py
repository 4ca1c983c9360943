"""Heuristic quality filters with their published thresholds as defaults.

- Gopher quality and repetition rules: Rae et al. 2021, "Scaling Language Models: Methods, Analysis &
  Insights from Training Gopher", appendix A.1.1 (MassiveWeb).
- C4 rules: Raffel et al. 2020, "Exploring the Limits of Transfer Learning ...", section 2.2.
- FineWeb rules: Penedo et al. 2024, "The FineWeb Datasets", section 3.5 (custom filters).

Words and sentences follow the document's language (`metadata.language`, from the langid step):
its stop words, its segmentation (whitespace, or one word per Han/kana character) and its word-length
bounds come from `steps/text.py` (FineWeb-2's approach). Without a language the English rules apply
as published. "Characters" are those of the words (no whitespace), as in the Gopher definitions.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from megaqwen.data_pipeline.document import Document
from megaqwen.data_pipeline.steps.base import Step
from megaqwen.data_pipeline.steps.junk import BOILERPLATE
from megaqwen.data_pipeline.steps.text import (
    PROFILES,
    SENTENCE_END,
    TERMINAL_PUNCT,
    LanguageProfile,
    profile_for,
    words,
)

BULLETS = ("•", "●", "○", "▪", "◦", "-", "*", "‣", "⁃", "–")
_ALPHA = re.compile(r"[^\W\d_]")
_CITATION = re.compile(r"\[\d+\]|\[citation needed\]|\[edit\]", re.IGNORECASE)


def _profile(doc: Document) -> LanguageProfile:
    return profile_for(doc.metadata.get("language"), doc.text)


@dataclass
class GopherQualityConfig:
    min_doc_words: int = 50
    """fewer words than this: too short."""
    max_doc_words: int = 100_000
    """more words than this: too long."""
    min_avg_word_length: float = 3.0
    """mean word length (characters, punctuation stripped) below this."""
    max_avg_word_length: float = 10.0
    """mean word length above this."""
    max_symbol_word_ratio: float = 0.1
    """('#' + '...' / '…' occurrences) per word above this."""
    max_bullet_lines_ratio: float = 0.9
    """fraction of lines starting with a bullet above this."""
    max_ellipsis_lines_ratio: float = 0.3
    """fraction of lines ending with an ellipsis above this."""
    min_alpha_words_ratio: float = 0.8
    """fraction of words containing a letter below this."""
    min_stop_words: int = 2
    """fewer distinct stop words of the document's language than this (steps/text.py lists them)."""
    max_replacement_fraction: float = 0.01
    """share of U+FFFD replacement characters (undecodable bytes) above this."""


class GopherQuality(Step):
    name = "gopher_quality"
    Config = GopherQualityConfig

    def process(self, doc: Document) -> str | None:
        c = self.cfg
        prof = _profile(doc)
        ws = words(doc.text, prof.cjk)
        n = len(ws)
        if n < c.min_doc_words:
            return "too_few_words"
        if n > c.max_doc_words:
            return "too_many_words"
        if doc.text.count("\ufffd") / max(len(doc.text), 1) > c.max_replacement_fraction:
            return "replacement_chars"
        lo, hi = (
            (c.min_avg_word_length, c.max_avg_word_length)
            if prof is PROFILES["en"]
            else (prof.min_avg_word_length, prof.max_avg_word_length)
        )
        avg = sum(len(w) for w in ws) / n
        if avg < lo:
            return "avg_word_too_short"
        if avg > hi:
            return "avg_word_too_long"
        symbols = doc.text.count("#") + doc.text.count("...") + doc.text.count("…")
        if symbols / n > c.max_symbol_word_ratio:
            return "symbol_word_ratio"
        lines = [ln for ln in doc.text.split("\n") if ln.strip()]
        if lines:
            if sum(ln.lstrip().startswith(BULLETS) for ln in lines) / len(lines) > c.max_bullet_lines_ratio:
                return "bullet_lines"
            ellipsis = sum(ln.rstrip().endswith(("...", "…")) for ln in lines)
            if ellipsis / len(lines) > c.max_ellipsis_lines_ratio:
                return "ellipsis_lines"
        if sum(bool(_ALPHA.search(w)) for w in ws) / n < c.min_alpha_words_ratio:
            return "alpha_words_ratio"
        if prof.stop_words and len(prof.stop_words.intersection(w.lower() for w in ws)) < c.min_stop_words:
            return "stop_words"
        return None


@dataclass
class GopherRepetitionConfig:
    max_dup_line_frac: float = 0.30
    """fraction of lines that are duplicates of an earlier line."""
    min_line_chars: int = 12
    """lines shorter than this (forum / UI words: "Reply", "Quote", "Share") are left out of the line
    and paragraph fractions; Gopher counts every line, which removed most clean forum threads."""
    max_dup_para_frac: float = 0.30
    """fraction of paragraphs (blank-line separated) that are duplicates."""
    max_dup_line_char_frac: float = 0.20
    """fraction of characters in duplicate lines."""
    max_dup_para_char_frac: float = 0.20
    """fraction of characters in duplicate paragraphs."""
    top_ngram_char_frac: list[list[float]] = field(default_factory=lambda: [[2, 0.20], [3, 0.18], [4, 0.16]])
    """[n, max]: fraction of characters covered by the most frequent word n-gram."""
    dup_ngram_char_frac: list[list[float]] = field(
        default_factory=lambda: [[5, 0.15], [6, 0.14], [7, 0.13], [8, 0.12], [9, 0.11], [10, 0.10]]
    )
    """[n, max]: fraction of characters in word n-grams that already occurred (each word once)."""


def _dup_fracs(parts: list[str]) -> tuple[float, float]:
    """(fraction of parts that repeat an earlier one, fraction of their characters)."""
    if not parts:
        return 0.0, 0.0
    seen: set[str] = set()
    dup_n = dup_chars = 0
    for p in parts:
        if p in seen:
            dup_n += 1
            dup_chars += len(p)
        seen.add(p)
    return dup_n / len(parts), dup_chars / max(sum(len(p) for p in parts), 1)


def _words_of(doc: Document) -> list[str]:
    prof = _profile(doc)
    return words(doc.text, True) if prof.cjk else doc.text.split()


class GopherRepetition(Step):
    name = "gopher_repetition"
    Config = GopherRepetitionConfig

    def process(self, doc: Document) -> str | None:
        c = self.cfg
        text = doc.text
        m = c.min_line_chars
        paras = [p.strip() for p in re.split(r"\n{2,}", text) if len(p.strip()) >= max(m, 1)]
        frac, char_frac = _dup_fracs(paras)
        if frac > c.max_dup_para_frac:
            return "dup_para_frac"
        if char_frac > c.max_dup_para_char_frac:
            return "dup_para_char_frac"
        lines = [ln.strip() for ln in text.split("\n") if len(ln.strip()) >= max(m, 1)]
        frac, char_frac = _dup_fracs(lines)
        if frac > c.max_dup_line_frac:
            return "dup_line_frac"
        if char_frac > c.max_dup_line_char_frac:
            return "dup_line_char_frac"
        words = _words_of(doc)
        total = sum(len(w) for w in words)
        if not total:
            return None
        for n, limit in c.top_ngram_char_frac:
            n = int(n)
            if len(words) < n:
                continue
            grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
            gram, count = grams.most_common(1)[0]
            if count > 1 and count * sum(len(w) for w in gram) / total > limit:
                return f"top_{n}gram"
        for n, limit in c.dup_ngram_char_frac:
            n = int(n)
            if len(words) < n:
                continue
            seen: set[tuple[str, ...]] = set()
            covered = [False] * len(words)
            for i in range(len(words) - n + 1):
                g = tuple(words[i : i + n])
                if g in seen:
                    covered[i : i + n] = [True] * n
                seen.add(g)
            if sum(len(w) for w, cov in zip(words, covered) if cov) / total > limit:
                return f"dup_{n}gram"
        return None


@dataclass
class C4Config:
    filter_no_terminal_punct: bool = True
    """drop lines that do not end in terminal punctuation (FineWeb turns this off)."""
    min_words_per_line: int = 3
    """drop lines with fewer words."""
    max_word_length: int = 1000
    """drop lines containing a longer word."""
    min_num_sentences: int = 5
    """remove the document if fewer sentences remain."""
    filter_javascript: bool = True
    """drop lines mentioning 'javascript'."""
    filter_policy: bool = True
    """drop lines with cookie / privacy / terms-of-use boilerplate."""
    filter_lorem_ipsum: bool = True
    """remove documents containing 'lorem ipsum'."""
    filter_curly_bracket: bool = True
    """remove documents containing '{' (C4's proxy for code; off when code is wanted)."""
    remove_citations: bool = True
    """strip Wikipedia-style citation markers such as [1]."""
    notice_lines_only: bool = False
    """with filter_javascript / filter_policy: drop only lines that read as notices ("please enable
    JavaScript", "we use cookies": web_junk's phrases), not every line of an article about JavaScript
    or privacy law (C4's default: false, every line; the shipped config: true)."""
    keep_attribution_lines: bool = False
    """keep short thread attribution lines ("Anna replied:", "mike_77 wrote:", "Quote from Bob:") that
    the words-per-line and punctuation rules drop (C4's default: false; the shipped config: true)."""


ATTRIBUTION = re.compile(
    r"^(@?[\w.'-]{1,30}( [\w.'-]{1,30}){0,2} (replied|wrote|said|posted|commented|answered|asked|"
    r"responded)( (on|at|in) [^:]{1,40})?|"
    r"(quote|reply|answer) (from|by|to) @?[\w.'-]{1,30}( [\w.'-]{1,30})?)\s*:$",
    re.IGNORECASE,
)

POLICY_PHRASES = (
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
)


class C4Filter(Step):
    """C4's line-level cleaning (rewrites the text) followed by its document-level rules."""

    name = "c4"
    Config = C4Config

    def process(self, doc: Document) -> str | None:
        c = self.cfg
        low = doc.text.lower()
        if c.filter_lorem_ipsum and "lorem ipsum" in low:
            return "lorem_ipsum"
        if c.filter_curly_bracket and "{" in doc.text:
            return "curly_bracket"
        cjk = _profile(doc).cjk
        kept = []
        for line in doc.text.split("\n"):
            s = line.strip()
            if not s:
                kept.append(line)  # keep paragraph structure
                continue
            if c.remove_citations:
                s = _CITATION.sub("", s)
            lower = s.lower()
            flagged = (c.filter_javascript and "javascript" in lower) or (
                c.filter_policy and any(p in lower for p in POLICY_PHRASES)
            )
            if flagged and (not c.notice_lines_only or BOILERPLATE.search(s)):
                continue
            if c.keep_attribution_lines and len(s) <= 80 and ATTRIBUTION.match(s):
                kept.append(s)
                continue
            ws = words(s, cjk) or s.split()
            if len(ws) < c.min_words_per_line or max(len(w) for w in ws) > c.max_word_length:
                continue
            if c.filter_no_terminal_punct and not s.endswith(TERMINAL_PUNCT):
                continue
            kept.append(s if c.remove_citations else line)
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip()
        if len(SENTENCE_END.findall(text)) < c.min_num_sentences:
            return "too_few_sentences"
        doc.text = text
        return None


@dataclass
class FineWebConfig:
    line_punct_thr: float = 0.12
    """remove if the fraction of lines ending in punctuation is at most this."""
    short_line_thr: float = 0.67
    """remove if the fraction of lines of at most `short_line_length` characters is at least this."""
    short_line_length: int = 30
    """characters: a line this long or shorter is short (CJK / Korean: the language profile's length)."""
    char_duplicates_ratio: float = 0.01
    """remove if the fraction of characters in duplicated lines is at least this."""
    new_line_ratio: float = 0.3
    """remove if newlines per word is above this (lists and menus)."""
    ignore_attribution_lines: bool = False
    """leave thread attribution lines ("Anna replied:", c4's `keep_attribution_lines`) out of the
    duplicated-characters ratio: one person answering twice is not a repeated line (shipped: true)."""


class FineWebFilter(Step):
    name = "fineweb"
    Config = FineWebConfig

    def process(self, doc: Document) -> str | None:
        c = self.cfg
        lines = [ln.strip() for ln in doc.text.split("\n") if ln.strip()]
        if not lines:
            return "empty"
        if sum(ln.endswith(TERMINAL_PUNCT) for ln in lines) / len(lines) <= c.line_punct_thr:
            return "line_punct_ratio"
        prof = _profile(doc)
        short = c.short_line_length if prof is PROFILES["en"] else prof.short_line_chars
        if sum(len(ln) <= short for ln in lines) / len(lines) >= c.short_line_thr:
            return "short_line_ratio"
        dup_lines = [ln for ln in lines if not ATTRIBUTION.match(ln)] if c.ignore_attribution_lines else lines
        _, dup_chars = _dup_fracs(dup_lines)
        # FineWeb measures duplicated characters against all non-newline characters
        if dup_chars >= c.char_duplicates_ratio:
            return "char_dup_ratio"
        ws = words(doc.text, prof.cjk)
        if doc.text.count("\n") / max(len(ws), 1) > c.new_line_ratio:
            return "list_ratio"
        return None
