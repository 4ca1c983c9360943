"""`megaqwen-data tokenize`: jsonl / jsonl.gz / jsonl.zst / parquet text -> int32 Megatron shard.

    megaqwen-data tokenize --input 'raw/*.jsonl.zst' --output-prefix shards/web [--workers 4]

Every document is tokenised with the Qwen2.5 BPE and ends with `<|endoftext|>` (151643) unless
`--no-eod`. Control-token strings that occur literally in the text (e.g. a web page quoting
"<|endoftext|>") are encoded as ordinary text, so the only EODs in a shard are the appended ones and
document boundaries stay exact. Input order is kept whatever the number of workers, so the same
inputs always give byte-identical shards. A malformed jsonl line (bad JSON, missing or non-string
text) is logged with its file and line, counted, and skipped. The run ends by printing a JSON
summary, also written to PREFIX.stats.json.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import io
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from megaqwen.data.indexed import IndexedDatasetBuilder
from megaqwen.tokenizer import EOD_ID

log = logging.getLogger("megaqwen.tokenize")
MAX_LOGGED_MALFORMED = 100  # past this, malformed lines are only counted (a bad dump can have millions)


@dataclass
class Stats:
    output_prefix: str
    files: int = 0
    documents: int = 0
    tokens: int = 0
    malformed: int = 0
    empty: int = 0  # valid records whose text is "" (skipped: they would be a lone EOD)
    seconds: float = 0.0
    malformed_by_file: dict[str, int] = field(default_factory=dict)
    corrupt_files: list[str] = field(default_factory=list)  # compressed streams that ended early / bad


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Files matching each pattern (or named literally), in pattern order, each sorted, no duplicates."""
    seen: dict[Path, None] = {}
    for pat in patterns:
        hits = sorted(glob.glob(pat, recursive=True)) or ([pat] if os.path.isfile(pat) else [])
        for h in hits:
            if os.path.isfile(h):
                seen.setdefault(Path(h), None)
    return list(seen)


class _Tracker:
    """Where reading is (compressed bytes), for progress lines."""

    def __init__(self, total_bytes: int):
        self.total_bytes = max(total_bytes, 1)
        self.done_bytes = 0  # bytes of finished files
        self.current = lambda: 0  # position inside the file being read

    @property
    def fraction(self) -> float:
        return min((self.done_bytes + self.current()) / self.total_bytes, 1.0)


def _open_lines(path: Path, raw: io.BufferedReader) -> io.BufferedReader:
    name = path.name.lower()
    if name.endswith(".gz"):
        return io.BufferedReader(gzip.GzipFile(fileobj=raw))
    if name.endswith(".zst") or name.endswith(".zstd"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
    return raw


def read_jsonl(path: Path, text_key: str, stats: Stats, tracker: _Tracker) -> Iterator[str]:
    with open(path, "rb") as raw:
        tracker.current = raw.tell
        for lineno, line in enumerate(_open_lines(path, raw), start=1):
            if not line.strip():
                continue
            why = None
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                why = f"invalid JSON ({e.msg if isinstance(e, json.JSONDecodeError) else e.reason})"
            else:
                if not isinstance(rec, dict) or text_key not in rec:
                    why = f"no {text_key!r} key"
                elif not isinstance(rec[text_key], str):
                    why = f"{text_key!r} is {type(rec[text_key]).__name__}, not a string"
            if why is None:
                yield rec[text_key]
            else:
                _malformed(stats, path, lineno, why)


def read_parquet(path: Path, text_key: str, stats: Stats, tracker: _Tracker) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_key not in pf.schema_arrow.names:
        raise ValueError(
            f"{path}: no column {text_key!r} (columns: {pf.schema_arrow.names}); choose one with --text-key"
        )
    nrows, size, row = max(pf.metadata.num_rows, 1), path.stat().st_size, 0
    tracker.current = lambda: size * row // nrows
    for batch in pf.iter_batches(columns=[text_key], batch_size=4096):
        for value in batch.column(0).to_pylist():
            row += 1
            if isinstance(value, str):
                yield value
            else:
                _malformed(stats, path, row, f"{text_key!r} is {type(value).__name__}, not a string")


def _malformed(stats: Stats, path: Path, where: int, why: str) -> None:
    stats.malformed += 1
    stats.malformed_by_file[str(path)] = stats.malformed_by_file.get(str(path), 0) + 1
    unit = "row" if path.suffix == ".parquet" else "line"
    if stats.malformed <= MAX_LOGGED_MALFORMED:
        log.warning("%s:%d: malformed %s skipped: %s", path, where, unit, why)
    if stats.malformed == MAX_LOGGED_MALFORMED:
        log.warning("further malformed records are counted but not logged")


def _corrupt_stream_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (EOFError, OSError)
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errors


def iter_texts(files: list[Path], text_key: str, stats: Stats, tracker: _Tracker) -> Iterator[str]:
    for path in files:
        reader = read_parquet if path.name.lower().endswith(".parquet") else read_jsonl
        try:
            yield from reader(path, text_key, stats, tracker)
        except _corrupt_stream_errors() as e:
            # A truncated download should not cost the whole run: keep what was read, name the file.
            log.error(
                "%s: unreadable from some point on (%s: %s); the documents before it are kept",
                path,
                type(e).__name__,
                e,
            )
            stats.corrupt_files.append(str(path))
        tracker.done_bytes += path.stat().st_size
        tracker.current = lambda: 0
        stats.files += 1


def _batches(texts: Iterator[str], size: int, stats: Stats) -> Iterator[list[str]]:
    batch: list[str] = []
    for t in texts:
        if not t:
            stats.empty += 1
            continue
        batch.append(t)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---- tokenising (in the main process or in pool workers) ----
_TOKENIZER = None


def _init_worker(single_thread: bool) -> None:
    global _TOKENIZER
    if single_thread:
        # N worker processes each with a full rayon pool would oversubscribe the cores.
        os.environ["RAYON_NUM_THREADS"] = "1"
    from megaqwen.tokenizer import load_tokenizer

    _TOKENIZER = load_tokenizer().backend_tokenizer
    _TOKENIZER.encode_special_tokens = True  # literal "<|endoftext|>" in text is text, not a boundary


def _encode(texts: list[str], add_eod: bool) -> list[np.ndarray]:
    encs = _TOKENIZER.encode_batch_fast(texts, add_special_tokens=False)
    tail = [EOD_ID] if add_eod else []
    return [np.asarray(e.ids + tail, dtype=np.int32) for e in encs]


class _Progress:
    def __init__(self, tracker: _Tracker, every_s: float):
        self.tracker, self.every_s = tracker, every_s
        self.t0 = self.last = time.perf_counter()

    def maybe_log(self, stats: Stats, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < self.every_s:
            return
        self.last, dt, frac = now, max(now - self.t0, 1e-9), self.tracker.fraction
        eta = dt * (1 - frac) / frac if frac > 0 else float("nan")
        log.info(
            "%d docs (%.0f docs/s), %.2fM tokens (%.0f tokens/s), %.1f%% of input read, ETA %.0fs",
            stats.documents,
            stats.documents / dt,
            stats.tokens / 1e6,
            stats.tokens / dt,
            100 * frac,
            eta,
        )


def tokenize_files(
    files: list[Path],
    output_prefix: str,
    text_key: str = "text",
    workers: int = 1,
    batch_size: int = 256,
    add_eod: bool = True,
    log_every_s: float = 10.0,
) -> Stats:
    """Tokenise `files` into one shard at `output_prefix`; returns the run's counts.

    Raises ValueError (and leaves no shard) when no valid, non-empty document was found.
    """
    stats = Stats(output_prefix=str(output_prefix))
    tracker = _Tracker(sum(p.stat().st_size for p in files))
    progress = _Progress(tracker, log_every_s)
    batches = _batches(iter_texts(files, text_key, stats, tracker), batch_size, stats)
    t0 = time.perf_counter()
    with IndexedDatasetBuilder(output_prefix, dtype=np.int32) as builder:

        def write(docs: list[np.ndarray]) -> None:
            for d in docs:
                builder.add_document(d)
            stats.documents += len(docs)
            stats.tokens += sum(len(d) for d in docs)
            progress.maybe_log(stats)

        if workers <= 1:
            for batch in batches:
                if _TOKENIZER is None:  # loaded on the first batch: a run with no valid text fails fast
                    _init_worker(single_thread=False)
                write(_encode(batch, add_eod))
        else:
            import multiprocessing as mp

            # A bounded window of in-flight batches, consumed in submission order: output order is
            # input order, and memory stays flat (Pool.imap would read the whole input ahead).
            with mp.get_context("spawn").Pool(workers, _init_worker, (True,)) as pool:
                pending: collections.deque = collections.deque()
                for batch in batches:
                    pending.append(pool.apply_async(_encode, (batch, add_eod)))
                    if len(pending) >= 2 * workers:
                        write(pending.popleft().get())
                while pending:
                    write(pending.popleft().get())
        if stats.documents == 0:
            raise ValueError(
                f"no valid document in {len(files)} input file(s) ({stats.malformed} malformed, "
                f"{stats.empty} empty); nothing written to {output_prefix}"
            )
    stats.seconds = round(time.perf_counter() - t0, 3)
    progress.maybe_log(stats, force=True)
    return stats


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.workers < 1:
        print(
            f"megaqwen-data tokenize: --batch-size ({args.batch_size}) and --workers ({args.workers}) "
            "must be >= 1",
            file=sys.stderr,
        )
        return 2
    files = expand_inputs(args.input)
    if not files:
        print(f"megaqwen-data tokenize: no input file matched {args.input}", file=sys.stderr)
        return 2
    try:
        stats = tokenize_files(
            files,
            args.output_prefix,
            args.text_key,
            args.workers,
            args.batch_size,
            add_eod=not args.no_eod,
            log_every_s=args.log_every,
        )
    except (ValueError, OSError) as e:
        print(f"megaqwen-data tokenize: {e}", file=sys.stderr)
        return 1
    summary = asdict(stats)
    summary["tokens_per_s"] = round(stats.tokens / max(stats.seconds, 1e-9))
    Path(f"{args.output_prefix}.stats.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))
    if stats.corrupt_files:
        log.error("%d corrupt or truncated file(s): %s", len(stats.corrupt_files), stats.corrupt_files)
    if stats.malformed:
        log.warning("%d malformed record(s) skipped, by file: %s", stats.malformed, stats.malformed_by_file)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "tokenize",
        help="tokenise text into a Megatron .bin/.idx shard",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="FILE_OR_GLOB",
        help="jsonl, jsonl.gz, jsonl.zst or parquet files (globs allowed, quote them)",
    )
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.stats.json")
    p.add_argument("--text-key", default="text", help="json key / parquet column holding the text")
    p.add_argument("--workers", type=int, default=1, help="tokeniser processes (1: in-process)")
    p.add_argument("--batch-size", type=int, default=256, help="documents per tokeniser call")
    p.add_argument("--no-eod", action="store_true", help="do not append <|endoftext|> to each document")
    p.add_argument("--log-every", type=float, default=10.0, help="seconds between progress lines")
    p.set_defaults(func=run)
