"""Reading documents (jsonl / parquet / HF `datasets` folders, plain, gzip or zstd) and writing jsonl.

A malformed record (bad JSON, not an object, no text, non-string text) never stops a run: it is
counted under a reason in the reader's `StepStats` ("read") and the first few are logged with their
file and line. A compressed file that is cut short or damaged ends that file, not the run: the records
before the damage are kept, the file is counted once as `malformed:truncated_file` and listed in
`Reader.corrupt_files`. Both the pipeline's filter stage and `megaqwen-data tokenize` read through
`Reader`.
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
        return self.path if self.parts == 1 else f"{self.path}[{self.part}/{self.parts}]"

    @property
    def nbytes(self) -> int:
        """This part's share of the file's (compressed) bytes; 0 for a HF datasets folder."""
        if not os.path.isfile(self.path):
            return 0
        size = os.path.getsize(self.path)
        return size * (self.part + 1) // self.parts - size * self.part // self.parts


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


def _decompressed(path: str, raw: io.BufferedIOBase) -> io.BufferedIOBase:
    """`raw` itself, or a decompressing reader over it (chosen by the suffix of `path`)."""
    lower = path.lower()
    if lower.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)  # (does not close `raw`: callers hold it in a `with`)
    if lower.endswith(".zst") or lower.endswith(".zstd"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return raw


def _damaged_stream_errors() -> tuple[type[BaseException], ...]:
    # OSError covers gzip.BadGzipFile; zstandard raises ZstdError on damaged frames (a cut stream
    # just stops, and its partial last line is then invalid JSON)
    errors: tuple[type[BaseException], ...] = (EOFError, OSError, zlib.error)
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errors


class Reader:
    """Yields `Document`s from `InputPart`s, counting malformed records in `self.stats`.

    `metadata=False` keeps only the text (and id): parquet files then read only the text column.
    """

    def __init__(self, text_key: str = "text", id_key: str = "id", metadata: bool = True):
        self.text_key, self.id_key, self.metadata = text_key, id_key, metadata
        self.stats = StepStats("read")
        self.corrupt_files: list[str] = []  # compressed inputs that ended early or were damaged
        self._done_bytes = 0  # of the parts finished so far
        self._position = lambda: 0  # (compressed) bytes read of the current part
        self._unit = "record"  # what a position in a log line counts: "line" (jsonl) or "row"

    @property
    def bytes_read(self) -> int:
        """(Compressed) input bytes read so far over all parts, for progress."""
        return self._done_bytes + self._position()

    @property
    def malformed(self) -> int:
        """Records skipped as malformed (a damaged file, counted once, is not a record)."""
        return self.stats.removed - self.stats.reasons["malformed:truncated_file"]

    def _record(self, rec: Any, where: str, default_id: str) -> Document | None:
        self.stats.seen += 1
        if not isinstance(rec, dict):
            return self._bad(where, "malformed:not_an_object")
        if self.text_key not in rec:
            return self._bad(where, "malformed:missing_text", f"no {self.text_key!r} key")
        text = rec[self.text_key]
        if not isinstance(text, str):
            return self._bad(where, f"malformed:text_is_{type(text).__name__}")
        meta = (
            {k: v for k, v in rec.items() if k not in (self.text_key, self.id_key)} if self.metadata else {}
        )
        self.stats.kept += 1
        return Document(str(rec.get(self.id_key, default_id)), text, meta)

    def _bad(self, where: str, reason: str, detail: str = "") -> None:
        self.stats.remove(reason)
        n = self.malformed
        if n <= MAX_LOGGED:
            why = reason.removeprefix("malformed:") + (f" ({detail})" if detail else "")
            log.warning("%s: malformed %s skipped: %s", where, self._unit, why)
        if n == MAX_LOGGED:
            log.warning("further malformed records are counted but not logged")
        return None

    def read(self, part: InputPart) -> Iterator[Document]:
        p = part.path
        try:
            if Path(p).is_dir():
                yield from self._read_hf(p)
            elif p.lower().endswith(".parquet"):
                yield from self._read_parquet(p)
            else:
                yield from self._read_jsonl(part)
        finally:
            self._done_bytes += part.nbytes
            self._position = lambda: 0

    def _read_jsonl(self, part: InputPart) -> Iterator[Document]:
        with open(part.path, "rb") as raw, _decompressed(part.path, raw) as f:
            # byte range [start, end) of the file (compressed files are one part): a line belongs
            # to the part where it starts
            start, end = 0, None
            if part.parts > 1:
                size = os.path.getsize(part.path)
                start, end = size * part.part // part.parts, size * (part.part + 1) // part.parts
                if start > 0:
                    f.seek(start - 1)
                    f.readline()  # finish the line that started before `start`
            pos = f.tell()
            self._unit = "line"
            # read lazily (a tell() per line would be a syscall per line)
            self._position = lambda: min(raw.tell() - start, part.nbytes) if not raw.closed else 0
            lineno = 0  # within the part (global line numbers would need a scan of earlier parts)
            for line in self._lines(f, part.name):
                if end is not None and pos >= end:
                    break
                pos += len(line)
                lineno += 1
                if not line.strip():
                    continue
                where = f"{part.name}:{lineno}"
                try:
                    rec = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    self.stats.seen += 1
                    detail = e.msg if isinstance(e, json.JSONDecodeError) else e.reason
                    self._bad(where, "malformed:invalid_json", detail)
                    continue
                doc = self._record(rec, where, f"{Path(part.path).name}/{part.part}/{lineno}")
                if doc is not None:
                    yield doc

    def _lines(self, f: io.BufferedIOBase, name: str) -> Iterator[bytes]:
        """Lines of `f`; a damaged or cut compressed stream (an interrupted copy) ends the file."""
        try:
            yield from f
        except _damaged_stream_errors() as e:
            self.stats.seen += 1
            self.stats.remove("malformed:truncated_file")
            self.corrupt_files.append(name)
            log.error(
                "%s: unreadable from some point on (%s: %s); the records before it are kept",
                name,
                type(e).__name__,
                e,
            )

    def _read_parquet(self, path: str) -> Iterator[Document]:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if self.text_key not in names:
            raise ValueError(f"{path}: no column {self.text_key!r} (columns: {names})")
        columns = None if self.metadata else [c for c in (self.text_key, self.id_key) if c in names]
        nrows, size, row = max(pf.metadata.num_rows, 1), os.path.getsize(path), 0
        self._position = lambda: size * row // nrows
        self._unit = "row"
        for batch in pf.iter_batches(batch_size=1024, columns=columns):
            for rec in batch.to_pylist():
                row += 1
                doc = self._record(rec, f"{path}:{row}", f"{Path(path).name}/{row}")
                if doc is not None:
                    yield doc

    def _read_hf(self, path: str) -> Iterator[Document]:
        # `datasets.save_to_disk` folders hold Arrow IPC stream files; read them with pyarrow so the
        # pipeline does not need the `datasets` package itself.
        import pyarrow as pa

        files = sorted(Path(path).rglob("*.arrow"))
        if not files:
            raise ValueError(f"{path}: looks like a HF datasets folder but holds no .arrow file")
        row = 0
        self._unit = "row"
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
                        doc = self._record(rec, f"{file}:{row}", f"{Path(path).name}/{row}")
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
    with open(path, "rb") as raw, _decompressed(str(path), raw) as f:
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
