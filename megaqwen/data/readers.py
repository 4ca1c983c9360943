"""Reading text records (jsonl / parquet / HF `datasets` folders, plain, gzip or zstd) that never dies
on one bad line.

- A malformed record (bad JSON, not an object, no text, non-string text) is counted under a reason
  in `Reader.stats`; each input ends with one summary line (counts by reason, the first *file* line
  numbers, also for byte-range parts of a file), and the first few records are logged at DEBUG.
- Bytes that are not valid UTF-8 (a Latin-1 line, a cut multi-byte character) are decoded with
  U+FFFD replacement characters: the record is kept and counted under `repairs["invalid_utf8"]`.
- Lone UTF-16 surrogates (`"\\ud83d"` escapes, common in scraped JSON) cannot be encoded as UTF-8,
  so every writer and tokenizer would fail on them later: escaped surrogate *pairs* are joined into
  their character, lone ones become U+FFFD (`repairs["lone_surrogate"]`), in text, id and metadata.
- A compressed file that is cut short or damaged ends that file, not the run: the records before
  the damage are kept, the file is counted once as `malformed:truncated_file`.

Both `megaqwen-data tokenize` (through `megaqwen.data.tokenize`) and the curation pipeline read
through `Reader`; it lives here, under `megaqwen.data`, so that the trainer's tokenising path never
imports the pipeline.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import logging
import os
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("megaqwen.data.readers")
MAX_EXAMPLES = 5  # skipped records per input named in its summary and logged (at DEBUG) with the reason
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


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


@dataclass
class TextRecord:
    """One record read: text, id, the other fields, and where it came from (`file:line`)."""

    id: str
    text: str
    metadata: dict[str, Any]
    source: str


@dataclass
class ReadStats:
    """Records seen / kept / skipped (by reason) and repaired (by kind); JSON like a pipeline step's."""

    name: str = "read"
    seen: int = 0
    kept: int = 0
    removed: int = 0
    modified: int = 0  # kept records whose text was repaired (invalid UTF-8, lone surrogates)
    reasons: Counter = field(default_factory=Counter)
    repairs: Counter = field(default_factory=Counter)

    def remove(self, reason: str) -> None:
        self.removed += 1
        self.reasons[reason] += 1

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seen": self.seen,
            "kept": self.kept,
            "removed": self.removed,
            "modified": self.modified,
            "reasons": dict(sorted(self.reasons.items())),
            "changes": dict(sorted(self.repairs.items())),
        }


class SkipSummary:
    """What reading one input skipped (by reason) and repaired (by kind): the first MAX_EXAMPLES
    skipped records logged at DEBUG, then one summary line for the input (`report`), instead of a
    warning per bad line."""

    def __init__(self, name: str, logger: logging.Logger = log):
        self.name, self.log = name, logger
        self.skipped: Counter = Counter()
        self.repaired: Counter = Counter()
        self.unit = "record"
        self._first: list[str] = []  # positions (line or row numbers) of the first skipped records

    def skip(self, where: str, reason: str, detail: str = "", unit: str = "record") -> None:
        """Count a skipped record at `where` (`file:line`) under `reason`."""
        reason, self.unit = reason.removeprefix("malformed:"), unit
        self.skipped[reason] += 1
        if len(self._first) < MAX_EXAMPLES:
            self._first.append(where.rsplit(":", 1)[-1])
            why = reason + (f" ({detail})" if detail else "")
            self.log.debug("%s: malformed %s skipped: %s", where, unit, why)

    def summary(self) -> str | None:
        """`NAME: 7 malformed lines skipped (invalid_json 3, ...) at lines 166, 171, ...`; None if clean."""
        def counts(c: Counter) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))

        out = []
        n = sum(self.skipped.values())
        if n:
            more = ", ..." if n > len(self._first) else ""
            out.append(f"{n} malformed {self.unit}{'s' * (n > 1)} skipped ({counts(self.skipped)}) at "
                       f"{self.unit}{'s' * (n > 1)} {', '.join(self._first)}{more}")
        r = sum(self.repaired.values())
        if r:
            out.append(f"{r} record{'s' * (r > 1)} kept after repair ({counts(self.repaired)})")
        return f"{self.name}: " + "; ".join(out) if out else None

    def report(self) -> None:
        """The summary as one WARNING when records were skipped (INFO when only repaired)."""
        line = self.summary()
        if line:
            self.log.log(logging.WARNING if self.skipped else logging.INFO, "%s", line)


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


def decompressed(path: str, raw: io.BufferedIOBase) -> io.BufferedIOBase:
    """`raw` itself, or a decompressing reader over it (chosen by the suffix of `path`)."""
    lower = path.lower()
    if lower.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)  # (does not close `raw`: callers hold it in a `with`)
    if lower.endswith(".zst") or lower.endswith(".zstd"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return raw


def json_records(path: str, on_bad: Callable[[str, str, str], None]) -> Iterator[tuple[str, Any]]:
    """(`file:line`, parsed JSON value) for each non-blank line of a jsonl file (plain, .gz, .zst), or
    (`file:row`, row dict) for each row of a parquet file: the raw reader of record files whose records
    are not text documents (chat conversations, preference pairs, prompts; `Reader` reads those). A
    line that is not JSON calls `on_bad(where, "invalid_json", message)`, which counts it or raises."""
    if path.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                row += 1
                yield f"{path}:{row}", rec
        return
    with open(path, "rb") as raw, decompressed(path, raw) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line.decode("utf-8", "replace").removeprefix("\ufeff"))
            except json.JSONDecodeError as e:
                on_bad(where, "invalid_json", e.msg)


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


def fix_surrogates(s: str) -> tuple[str, int]:
    """(`s` with surrogate pairs joined and lone surrogates replaced by U+FFFD, lone ones replaced)."""
    if not _SURROGATE.search(s):
        return s, 0
    fixed = s.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return fixed, fixed.count("\ufffd") - s.count("\ufffd")


def _fix_tree(obj: Any) -> tuple[Any, int]:
    """fix_surrogates over every string (keys too) of a parsed JSON value."""
    if isinstance(obj, str):
        return fix_surrogates(obj)
    if isinstance(obj, list):
        out, n = [], 0
        for v in obj:
            v, k = _fix_tree(v)
            out.append(v)
            n += k
        return out, n
    if isinstance(obj, dict):
        d, n = {}, 0
        for k, v in obj.items():
            k, a = _fix_tree(k)
            v, b = _fix_tree(v)
            d[k] = v
            n += a + b
        return d, n
    return obj, 0


def _lines_before(path: str, offset: int) -> int:
    """Newlines in the first `offset` bytes of a plain file (the line number base of a byte-range part)."""
    n = 0
    with open(path, "rb") as f:
        left = offset
        while left > 0:
            chunk = f.read(min(left, 1 << 22))
            if not chunk:
                break
            n += chunk.count(b"\n")
            left -= len(chunk)
    return n


class Reader:
    """Yields `TextRecord`s from `InputPart`s, counting malformed and repaired records in `self.stats`.

    `metadata=False` keeps only the text (and id): parquet files then read only the text column.
    """

    def __init__(self, text_key: str = "text", id_key: str = "id", metadata: bool = True):
        self.text_key, self.id_key, self.metadata = text_key, id_key, metadata
        self.stats = ReadStats()
        self.corrupt_files: list[str] = []  # compressed inputs that ended early or were damaged
        self._done_bytes = 0  # of the parts finished so far
        self._position = lambda: 0  # (compressed) bytes read of the current part
        self._unit = "record"  # what a position in a log line counts: "line" (jsonl) or "row"
        self._skips = SkipSummary("")  # of the part being read

    @property
    def bytes_read(self) -> int:
        """(Compressed) input bytes read so far over all parts, for progress."""
        return self._done_bytes + self._position()

    @property
    def malformed(self) -> int:
        """Records skipped as malformed (a damaged file, counted once, is not a record)."""
        return self.stats.removed - self.stats.reasons["malformed:truncated_file"]

    def _record(self, rec: Any, where: str, default_id: str, repaired: list[str]) -> TextRecord | None:
        self.stats.seen += 1
        if not isinstance(rec, dict):
            return self._bad(where, "malformed:not_an_object")
        if self.text_key not in rec:
            return self._bad(where, "malformed:missing_text", f"no {self.text_key!r} key")
        text = rec[self.text_key]
        if not isinstance(text, str):
            return self._bad(where, f"malformed:text_is_{type(text).__name__}")
        text, lone = fix_surrogates(text)  # (jsonl records were fixed whole already; others: text)
        if lone:
            repaired.append("lone_surrogate")
        meta = (
            {k: v for k, v in rec.items() if k not in (self.text_key, self.id_key)} if self.metadata else {}
        )
        self.stats.kept += 1
        if repaired:
            self.stats.modified += 1
            self.stats.repairs.update(set(repaired))
            self._skips.repaired.update(set(repaired))
        doc_id = rec.get(self.id_key)
        return TextRecord(default_id if doc_id is None else str(doc_id), text, meta, where)

    def _bad(self, where: str, reason: str, detail: str = "") -> None:
        self.stats.remove(reason)
        self._skips.skip(where, reason, detail, self._unit)
        return None

    def read(self, part: InputPart) -> Iterator[TextRecord]:
        """The records of `part`; what it skipped or repaired is logged as one line at the end."""
        p = part.path
        skips = self._skips = SkipSummary(part.name)
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
            skips.report()

    def _read_jsonl(self, part: InputPart) -> Iterator[TextRecord]:
        with open(part.path, "rb") as raw, decompressed(part.path, raw) as f:
            # byte range [start, end) of the file (compressed files are one part): a line belongs
            # to the part where it starts
            start, end, lineno = 0, None, 0
            if part.parts > 1:
                size = os.path.getsize(part.path)
                start, end = size * part.part // part.parts, size * (part.part + 1) // part.parts
                if start > 0:
                    f.seek(start - 1)
                    f.readline()  # finish the line that started before `start`
                    # line numbers are the file's: count the lines of the earlier parts (~1 GB/s)
                    lineno = _lines_before(part.path, f.tell())
            pos = f.tell()
            self._unit = "line"
            # read lazily (a tell() per line would be a syscall per line)
            self._position = lambda: min(raw.tell() - start, part.nbytes) if not raw.closed else 0
            name = Path(part.path).name
            for line in self._lines(f, part.name):
                if end is not None and pos >= end:
                    break
                pos += len(line)
                lineno += 1
                if not line.strip():
                    continue
                where = f"{part.path}:{lineno}"
                repaired: list[str] = []
                try:
                    s = line.decode("utf-8")
                except UnicodeDecodeError:
                    s = line.decode("utf-8", "replace")  # Latin-1 or broken bytes: keep the record
                    repaired.append("invalid_utf8")
                if lineno == 1:
                    s = s.removeprefix("\ufeff")  # a UTF-8 byte-order mark is not JSON
                try:
                    rec = json.loads(s)
                except json.JSONDecodeError as e:
                    self.stats.seen += 1
                    self._bad(where, "malformed:invalid_json", e.msg)
                    continue
                if _SURROGATE_ESCAPE.search(line):
                    rec, lone = _fix_tree(rec)
                    if lone:
                        repaired.append("lone_surrogate")
                rec_ = self._record(rec, where, f"{name}/{lineno}", repaired)
                if rec_ is not None:
                    yield rec_

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

    def _read_parquet(self, path: str) -> Iterator[TextRecord]:
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
                doc = self._record(rec, f"{path}:{row}", f"{Path(path).name}/{row}", [])
                if doc is not None:
                    yield doc

    def _read_hf(self, path: str) -> Iterator[TextRecord]:
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
                        doc = self._record(rec, f"{file}:{row}", f"{Path(path).name}/{row}", [])
                        if doc is not None:
                            yield doc
