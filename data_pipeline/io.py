"""Reading documents (jsonl / parquet / HF `datasets` folders, plain, gzip or zstd) and writing jsonl.

A malformed record (bad JSON, not an object, no text, non-string text) never stops a run: it is
counted under a reason in the reader's `StepStats` ("read") and the first few are logged with their
file and line.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import logging
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megaqwen.data_pipeline.document import Document, StepStats

log = logging.getLogger("megaqwen.data_pipeline.io")
MAX_LOGGED = 20  # malformed lines logged per task; the rest are only counted


@dataclass(frozen=True)
class InputPart:
    """One unit of reading work: a whole file, or byte range `part` of `parts` of a plain jsonl file."""

    path: str
    part: int = 0
    parts: int = 1

    @property
    def name(self) -> str:
        return f"{self.path}[{self.part}/{self.parts}]"


def _is_hf_dataset_dir(p: Path) -> bool:
    return p.is_dir() and (
        (p / "dataset_info.json").is_file()
        or (p / "state.json").is_file()
        or (p / "dataset_dict.json").is_file()
    )


def expand_inputs(patterns: list[str], parts_per_file: int = 1) -> list[InputPart]:
    """Input parts for glob patterns, in sorted order; plain .jsonl files are split by byte ranges."""
    seen: dict[str, None] = {}
    for pat in patterns:
        hits = sorted(glob.glob(pat, recursive=True)) or ([pat] if os.path.exists(pat) else [])
        for h in hits:
            if os.path.isfile(h) or _is_hf_dataset_dir(Path(h)):
                seen.setdefault(h, None)
    if not seen:
        raise FileNotFoundError(f"no input file matched {patterns}")
    parts = []
    for path in seen:
        n = parts_per_file if path.endswith(".jsonl") or path.endswith(".json") else 1
        parts += [InputPart(path, i, n) for i in range(n)]
    return parts


def _open_binary(path: str) -> io.BufferedIOBase:
    raw = open(path, "rb")  # noqa: SIM115 (returned to the caller, closed with the wrapper)
    lower = path.lower()
    if lower.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    if lower.endswith(".zst") or lower.endswith(".zstd"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return raw


class Reader:
    """Yields `Document`s from one `InputPart`, counting malformed records in `self.stats`."""

    def __init__(self, text_key: str = "text", id_key: str = "id"):
        self.text_key, self.id_key = text_key, id_key
        self.stats = StepStats("read")
        self.bytes_read = 0  # of the (compressed) input, for progress

    def _record(self, rec: Any, where: str, default_id: str) -> Document | None:
        self.stats.seen += 1
        if not isinstance(rec, dict):
            return self._bad(where, "malformed:not_an_object")
        if self.text_key not in rec:
            return self._bad(where, "malformed:missing_text")
        text = rec[self.text_key]
        if not isinstance(text, str):
            return self._bad(where, f"malformed:text_is_{type(text).__name__}")
        meta = {k: v for k, v in rec.items() if k not in (self.text_key, self.id_key)}
        self.stats.kept += 1
        return Document(str(rec.get(self.id_key, default_id)), text, meta)

    def _bad(self, where: str, reason: str) -> None:
        self.stats.remove(reason)
        if self.stats.removed <= MAX_LOGGED:
            log.warning("%s: %s skipped", where, reason)
        return None

    def read(self, part: InputPart) -> Iterator[Document]:
        p = part.path
        lower = p.lower()
        if Path(p).is_dir():
            yield from self._read_hf(p)
        elif lower.endswith(".parquet"):
            yield from self._read_parquet(p)
        else:
            yield from self._read_jsonl(part)

    def _read_jsonl(self, part: InputPart) -> Iterator[Document]:
        with _open_binary(part.path) as f:
            start = end = None
            if part.parts > 1:
                # byte range [start, end): a line belongs to the part where it starts
                size = os.path.getsize(part.path)
                start, end = size * part.part // part.parts, size * (part.part + 1) // part.parts
                if start > 0:
                    f.seek(start - 1)
                    f.readline()  # finish the line that started before `start`
            pos = f.tell()
            lineno = 0  # within the part (global line numbers would need a scan of earlier parts)
            for line in self._lines(f, part.name):
                if end is not None and pos >= end:
                    break
                pos += len(line)
                lineno += 1
                self.bytes_read = pos - (start or 0)
                if not line.strip():
                    continue
                where = f"{part.name}:{lineno}"
                try:
                    rec = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    self.stats.seen += 1
                    self._bad(where, "malformed:invalid_json")
                    continue
                doc = self._record(rec, where, f"{Path(part.path).name}/{part.part}/{lineno}")
                if doc is not None:
                    yield doc

    def _lines(self, f: io.BufferedIOBase, name: str) -> Iterator[bytes]:
        """Lines of `f`; a compressed file cut short (an interrupted copy) ends the part, counted once
        as `malformed:truncated_file`, instead of failing the task: the lines before the cut are kept."""
        try:
            yield from f
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            # (zstandard's stream reader just stops at a cut; a partial last line is then invalid JSON)
            self._truncated(name, e)

    def _truncated(self, name: str, err: Exception) -> None:
        self.stats.seen += 1
        self.stats.remove("malformed:truncated_file")
        log.warning("%s: compressed stream is damaged or cut short (%s); kept the lines before it", name, err)

    def _read_parquet(self, path: str) -> Iterator[Document]:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if self.text_key not in pf.schema_arrow.names:
            raise ValueError(f"{path}: no column {self.text_key!r} (columns: {pf.schema_arrow.names})")
        row = 0
        for batch in pf.iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                row += 1
                doc = self._record(rec, f"{path}:row {row}", f"{Path(path).name}/{row}")
                if doc is not None:
                    yield doc
        self.bytes_read = os.path.getsize(path)

    def _read_hf(self, path: str) -> Iterator[Document]:
        # `datasets.save_to_disk` folders hold Arrow IPC stream files; read them with pyarrow so the
        # pipeline does not need the `datasets` package itself.
        import pyarrow as pa

        files = sorted(Path(path).rglob("*.arrow"))
        if not files:
            raise ValueError(f"{path}: looks like a HF datasets folder but holds no .arrow file")
        row = 0
        for file in files:
            with pa.memory_map(str(file)) as src:
                try:
                    reader = pa.ipc.open_stream(src)
                except pa.ArrowInvalid:
                    reader = pa.ipc.open_file(src)
                batches = (
                    reader
                    if hasattr(reader, "__iter__")
                    else (reader.get_batch(i) for i in range(reader.num_record_batches))
                )
                for batch in batches:
                    for rec in batch.to_pylist():
                        row += 1
                        doc = self._record(rec, f"{file}:row {row}", f"{Path(path).name}/{row}")
                        if doc is not None:
                            yield doc


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
    with _open_binary(str(path)) as f:
        for line in f:
            if line.strip():
                yield Document.from_json(json.loads(line))


def write_documents(path: Path, docs) -> int:
    """Write docs atomically (temporary name, then rename); returns how many were written."""
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open_writer(tmp) as f:
        for d in docs:
            f.write(json.dumps(d.to_json(), ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n
