"""Web pages: main-text extraction from HTML (`html_extract`) and URL-level block lists (`url_filter`).

    steps:
      - name: url_filter            # before extraction: a blocked page costs no parsing
        blocked_domains: [example-casino.com]
        blocked_domains_file: lists/adult_domains.txt
      - name: html_extract          # trafilatura (default) or resiliparse
      - name: content_type
      ...

`html_extract` works on documents read from WARC / HTML files (`metadata.html`, see web.py) and on
jsonl records whose text field holds HTML (`detect: true` recognises them by their tags). Its row in
the report counts `html_bytes` and `text_bytes` under `changes`: the extraction yield.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from megaqwen.data_pipeline.document import Document
from megaqwen.data_pipeline.steps.base import Step

_HTML_START = re.compile(r"^\s*(<!doctype html|<html|<head|<body|<\?xml)", re.IGNORECASE)
_TAGS = re.compile(r"</(p|div|body|html|li|td|h[1-6]|span|a)>", re.IGNORECASE)
EXTRACTORS = ("trafilatura", "resiliparse")


def looks_like_html(text: str) -> bool:
    """A document start such as `<!DOCTYPE html>` / `<html>`, or at least 3 closing block tags per KB."""
    head = text[:2000]
    if _HTML_START.match(head):
        return True
    return len(_TAGS.findall(head)) >= 3 and len(_TAGS.findall(text)) * 1000 >= 3 * len(text)


def extract_trafilatura(html: str, url: str | None = None, comments: bool = True, fast: bool = True) -> str:
    import trafilatura

    out = trafilatura.extract(
        html,
        url=url,
        include_comments=comments,
        include_tables=True,
        fast=fast,
        deduplicate=False,
        with_metadata=False,
        output_format="txt",
    )
    return out or ""


def extract_resiliparse(html: str, url: str | None = None, comments: bool = True, fast: bool = True) -> str:
    from resiliparse.extract.html2text import extract_plain_text

    return extract_plain_text(
        html, main_content=True, comments=comments, alt_texts=False, links=False, list_bullets=True
    )


@dataclass
class HtmlExtractConfig:
    extractor: str = "trafilatura"
    """"trafilatura" (default: better main-text precision) or "resiliparse" (faster); see RESULTS.md."""
    detect: bool = True
    """also extract documents not marked `metadata.html` whose text looks like HTML (jsonl fields)."""
    include_comments: bool = True
    """keep the comment / reply section (forum threads, Q&A answers)."""
    fast: bool = True
    """trafilatura: skip its fallback extractors (readability, jusText): ~2x faster, little loss."""
    min_text_chars: int = 1
    """remove the page when less main text is extracted (`html_extract:no_main_text`)."""

    def __post_init__(self):
        if self.extractor not in EXTRACTORS:
            raise ValueError(f"html_extract.extractor must be one of {EXTRACTORS}, got {self.extractor!r}")


class HtmlExtract(Step):
    name = "html_extract"
    Config = HtmlExtractConfig

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self._extract = extract_trafilatura if self.cfg.extractor == "trafilatura" else extract_resiliparse

    def process(self, doc: Document) -> str | None:
        if not doc.metadata.get("html") and not (self.cfg.detect and looks_like_html(doc.text)):
            return None
        html = doc.text
        text = self._extract(html, doc.metadata.get("url"), self.cfg.include_comments, self.cfg.fast).strip()
        self.stats.changes["html_bytes"] += len(html.encode("utf-8", "replace"))
        doc.metadata["html"] = True
        doc.metadata["extractor"] = self.cfg.extractor
        if len(text) < self.cfg.min_text_chars:
            return "no_main_text"
        self.stats.changes["text_bytes"] += len(text.encode("utf-8", "replace"))
        doc.text = text
        return None


def _domain(url: str) -> str:
    try:
        host = urlsplit(url if "//" in url else f"//{url}").hostname or ""
    except ValueError:
        return ""
    return host.lower().removeprefix("www.")


def load_domain_list(path: str) -> set[str]:
    """One domain per line (`#` comments, blank lines and a leading `www.` ignored)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ValueError(f"url_filter.blocked_domains_file {path!r} cannot be read: {e}") from e
    return {ln.split("#")[0].strip().lower().removeprefix("www.") for ln in lines} - {""}


@dataclass
class UrlFilterConfig:
    blocked_domains: list[str] = field(default_factory=list)
    """domains whose pages (and subdomains' pages) are removed, e.g. [casino-example.com]."""
    blocked_domains_file: str = ""
    """a file with one blocked domain per line (adult / spam lists such as UT1's); "" for none."""
    blocked_url_words: list[str] = field(default_factory=list)
    """words that remove a page when they appear as a token of its URL (e.g. [porn, casino, xxx])."""
    url_key: str = "url"
    """metadata key holding the URL; documents without one are kept."""


class UrlFilter(Step):
    name = "url_filter"
    Config = UrlFilterConfig

    def __init__(self, cfg=None):
        super().__init__(cfg)
        c = self.cfg
        self._blocked = {d.lower().removeprefix("www.") for d in c.blocked_domains}
        if c.blocked_domains_file:
            self._blocked |= load_domain_list(c.blocked_domains_file)
        self._words = {w.lower() for w in c.blocked_url_words}

    def process(self, doc: Document) -> str | None:
        url = doc.metadata.get(self.cfg.url_key)
        if not isinstance(url, str) or not url:
            return None
        host = _domain(url)
        parts = host.split(".")
        if any(".".join(parts[i:]) in self._blocked for i in range(len(parts))):
            return "blocked_domain"
        if self._words and self._words & set(re.split(r"[^a-z0-9]+", url.lower())):
            return "blocked_url_word"
        return None
