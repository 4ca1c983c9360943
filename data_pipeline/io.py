"""The pipeline's reading (the shared `megaqwen.data.readers.Reader`, yielding `Document`s) and writing.

WARC / WARC.gz and HTML files are read by `web.py` (documents holding raw HTML plus url, fetch date
and language hint; the `html_extract` step extracts their main text).

Reading never stops on one bad record: see `megaqwen/data/readers.py` (malformed lines counted and
logged with file and line; invalid UTF-8 decoded with replacement; lone surrogates repaired).
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from megaqwen.data import readers
from megaqwen.data.readers import InputPart, decompressed, expand_inputs
from megaqwen.data_pipeline.document import Document
from megaqwen.data_pipeline.web import is_web_input, read_web

__all__ = ["InputPart", "Reader", "expand_inputs", "open_writer", "read_documents", "write_documents",
           "write_lines"]


class Reader(readers.Reader):
    """`megaqwen.data.readers.Reader` yielding pipeline `Document`s (with their `file:line` source)."""

    def read(self, part: InputPart) -> Iterator[Document]:  # type: ignore[override]
        records = self._read_web(part) if is_web_input(part.path) else super().read(part)
        for r in records:
            yield Document(r.id, r.text, r.metadata, source=r.source)

    def _read_web(self, part: InputPart) -> Iterator[readers.TextRecord]:
        """WARC / HTML files (`web.py`): documents holding raw HTML for the `html_extract` step."""
        skips = self._skips = readers.SkipSummary(part.name)
        try:
            yield from read_web(self, part)
        finally:
            self._done_bytes += part.nbytes
            self._position = lambda: 0
            skips.report()


def open_writer(path: Path) -> io.TextIOBase:
    """A text writer for `.jsonl`, `.jsonl.gz` or `.jsonl.zst` (by suffix, ignoring a final `.tmp`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name.removesuffix(".tmp")
    if name.endswith(".zst"):
        import zstandard

        raw = open(path, "wb")  # noqa: SIM115
        return io.TextIOWrapper(
            zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=True), encoding="utf-8"
        )
    if name.endswith(".gz"):
        return io.TextIOWrapper(gzip.GzipFile(path, "wb", compresslevel=3), encoding="utf-8")
    return open(path, "w", encoding="utf-8")  # noqa: SIM115


def read_documents(path: Path) -> Iterator[Document]:
    """Documents written by this pipeline (trusted format: every line is a `Document.to_json`)."""
    with open(path, "rb") as raw, decompressed(str(path), raw) as f:
        for line in f:
            if line.strip():
                yield Document.from_json(json.loads(line))


def write_lines(path: Path, lines: Iterable[str]) -> int:
    """Write JSON lines atomically (temporary name, then rename); returns how many were written."""
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open_writer(tmp) as f:
        for line in lines:
            f.write(line + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def write_documents(path: Path, docs: Iterable[Document]) -> int:
    """Write docs atomically; returns how many were written."""
    return write_lines(path, (json.dumps(d.to_json(), ensure_ascii=False) for d in docs))
