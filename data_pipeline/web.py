"""Web input: Common Crawl WARC / WARC.gz files and HTML files, read as documents holding raw HTML.

Each HTML response becomes one document whose text is the page's HTML (the `html_extract` step,
steps/html.py, turns it into main text) and whose metadata keeps `url`, `fetch_date`,
`language_hint` (WARC-Identified-Content-Language, the HTTP Content-Language header or the page's
`<html lang>`, first found) and `html: true`. Records that are not HTML responses (requests,
metadata, images, PDFs) are skipped without counting; a record that cannot be read or decoded is
counted under `malformed:*` and named as `file:offset`; a damaged file stops at its first bad record
(a gzip member cannot be resynchronised), counted once as `malformed:truncated_file`. Never fatal.
"""

from __future__ import annotations

import gzip
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from megaqwen.data.readers import InputPart, Reader, TextRecord

WARC_SUFFIXES = (".warc", ".warc.gz", ".arc.gz")
HTML_SUFFIXES = (".html", ".htm", ".html.gz", ".htm.gz")
_CHARSET = re.compile(rb"""charset\s*=\s*["']?([A-Za-z0-9_.:-]+)""", re.IGNORECASE)
_HTML_LANG = re.compile(rb"""<html[^>]*?\slang\s*=\s*["']?([A-Za-z]{2,3})""", re.IGNORECASE)
MAX_PAGE_BYTES = 8 << 20  # a bigger "page" is a dump, not an article: counted as malformed:too_large


def is_web_input(path: str) -> bool:
    low = path.lower()
    return low.endswith(WARC_SUFFIXES) or low.endswith(HTML_SUFFIXES)


def decode_html(body: bytes, content_type: str = "") -> str:
    """HTML bytes to text: the HTTP header's charset, else the page's `<meta charset>`, else UTF-8
    (undecodable bytes become U+FFFD, which the quality filters count)."""
    m = _CHARSET.search(content_type.encode("latin-1", "replace")) or _CHARSET.search(body[:4096])
    enc = m.group(1).decode("ascii").lower() if m else "utf-8"
    try:
        return body.decode(enc, errors="replace")
    except LookupError:  # an unknown charset name
        return body.decode("utf-8", errors="replace")


def language_hint(body: bytes, *headers: str | None) -> str | None:
    for h in headers:
        if h:
            return h.split(",")[0].strip().split("-")[0].lower()[:3] or None
    m = _HTML_LANG.search(body[:4096])
    return m.group(1).decode("ascii").lower() if m else None


def read_web(reader: Reader, part: InputPart) -> Iterator[TextRecord]:
    """The HTML documents of one WARC or HTML file, counted in `reader.stats` (see the module doc)."""
    low = part.path.lower()
    if low.endswith(HTML_SUFFIXES):
        yield from _read_html_file(reader, part)
    else:
        yield from _read_warc(reader, part)


def _record(reader: Reader, where: str, doc_id: str, html: str, meta: dict[str, Any]) -> TextRecord:
    reader.stats.seen += 1
    reader.stats.kept += 1
    return TextRecord(doc_id, html, {**meta, "html": True}, where)


def _read_html_file(reader: Reader, part: InputPart) -> Iterator[TextRecord]:
    path = part.path
    try:
        raw = Path(path).read_bytes()
        if path.lower().endswith(".gz"):
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        reader.stats.seen += 1
        reader._bad(f"{path}:0", "malformed:unreadable_html", f"{type(e).__name__}: {e}")
        return
    meta = {"url": Path(path).resolve().as_uri(), "language_hint": language_hint(raw)}
    yield _record(reader, f"{path}:0", Path(path).name, decode_html(raw), meta)


def _read_warc(reader: Reader, part: InputPart) -> Iterator[TextRecord]:
    from warcio.archiveiterator import ArchiveIterator

    path = part.path
    low = path.lower()
    with open(path, "rb") as f:
        reader._position = f.tell
        archive = ArchiveIterator(f, arc2warc=True)
        it = iter(archive)
        offset = 0
        while True:
            try:
                rec = next(it)
            except StopIteration:
                # warcio ends quietly at a gzip member cut short: bytes after the last whole member
                end = (archive.get_record_offset() or 0) + (archive.get_record_length() or 0)
                size = os.path.getsize(path)
                if low.endswith(".gz") and end < size:
                    reader.stats.seen += 1
                    reader._bad(
                        f"{path}:{end}",
                        "malformed:truncated_file",
                        f"{size - end} bytes after the last whole record",
                    )
                return
            except Exception as e:  # noqa: BLE001 - warcio raises assorted errors on damaged input
                reader.stats.seen += 1
                # (the byte position reached in the file: the damaged record starts before it)
                reader._bad(f"{path}:{f.tell()}", "malformed:truncated_file", f"{type(e).__name__}: {e}")
                return
            where = f"{path}:{offset}"  # (updated below: warcio knows the offset once the record is read)
            try:
                if not rec.rec_headers.get_header("WARC-Type"):  # a header block warcio could not parse
                    rec.content_stream().read(MAX_PAGE_BYTES)
                    reader.stats.seen += 1
                    reader._bad(
                        f"{path}:{archive.get_record_offset()}", "malformed:bad_record", "no WARC-Type header"
                    )
                    continue
                if rec.rec_type not in ("response", "resource"):
                    continue
                ctype = (rec.http_headers.get_header("Content-Type") if rec.http_headers else None) or (
                    rec.rec_headers.get_header("Content-Type") or ""
                )
                if rec.http_headers is not None and rec.http_headers.get_statuscode() not in ("200", None):
                    continue
                if "html" not in ctype.lower():
                    continue
                body = rec.content_stream().read(MAX_PAGE_BYTES + 1)
                offset = archive.get_record_offset()
                where = f"{path}:{offset}"
            except Exception as e:  # noqa: BLE001 - a bad record is counted and named, never fatal
                reader.stats.seen += 1
                reader._bad(where, "malformed:bad_record", f"{type(e).__name__}: {e}")
                continue
            if len(body) <= MAX_PAGE_BYTES and getattr(rec.raw_stream, "limit", 0) > 0:
                # the record's block ended before its Content-Length: the file was cut inside it
                reader.stats.seen += 1
                reader._bad(where, "malformed:truncated_file", "record cut short")
                return
            if len(body) > MAX_PAGE_BYTES:
                reader.stats.seen += 1
                reader._bad(where, "malformed:too_large", f"over {MAX_PAGE_BYTES} bytes")
                continue
            h = rec.rec_headers
            lang_http = rec.http_headers.get_header("Content-Language") if rec.http_headers else None
            meta = {
                "url": h.get_header("WARC-Target-URI"),
                "fetch_date": h.get_header("WARC-Date"),
                "language_hint": language_hint(
                    body, h.get_header("WARC-Identified-Content-Language"), lang_http
                ),
                "warc_record_id": h.get_header("WARC-Record-ID"),
            }
            doc_id = (meta["warc_record_id"] or f"{Path(path).name}:{offset}").strip("<>")
            yield _record(reader, where, doc_id, decode_html(body, ctype), meta)
