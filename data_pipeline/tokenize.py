"""`megaqwen-data tokenize`: jsonl (plain, .gz, .zst) / parquet / HF datasets text -> int32 Megatron shard.

    megaqwen-data tokenize --input 'raw/*.jsonl.zst' --output-prefix shards/web [--workers 4]

Every document is tokenised with the Qwen2.5 BPE and ends with `<|endoftext|>` (151643) unless
`--no-eod`. Control-token strings that occur literally in the text (e.g. a web page quoting
"<|endoftext|>") are encoded as ordinary text, so the only EODs in a shard are the appended ones and
document boundaries stay exact. Input order is kept whatever the number of workers, so the same
inputs always give byte-identical shards. Files are read by the pipeline's `Reader`: a malformed
record (bad JSON, missing or non-string text) is logged with its file and line, counted, and
skipped; a damaged compressed file keeps the records before the damage and is listed. The run ends
by printing a JSON summary, also written to PREFIX.stats.json.
"""

from __future__ import annotations

import argparse
import collections
import functools
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
from megaqwen.data_pipeline.io import InputPart, Reader, expand_inputs
from megaqwen.tokenizer import EOD_ID

log = logging.getLogger("megaqwen.tokenize")


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


def iter_texts(parts: list[InputPart], reader: Reader, stats: Stats) -> Iterator[str]:
    """The texts of `parts` in order, read by the pipeline's `Reader` (malformed records counted)."""
    for part in parts:
        before = reader.malformed
        for doc in reader.read(part):
            yield doc.text
        if reader.malformed > before:
            stats.malformed_by_file[part.path] = reader.malformed - before
        stats.files += 1
        stats.malformed, stats.corrupt_files = reader.malformed, list(reader.corrupt_files)


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
@functools.lru_cache(maxsize=2)
def text_tokenizer(path: str | None = None):
    """The `tokenizers.Tokenizer` for document text (loaded once per process and path).

    Control-token strings in the text are encoded as ordinary text (a literal "<|endoftext|>" is
    not a document boundary), so token counts taken with it match the shards exactly.
    """
    from megaqwen.tokenizer import load_tokenizer

    tok = load_tokenizer(path).backend_tokenizer
    tok.encode_special_tokens = True
    return tok


def _init_worker(single_thread: bool) -> None:
    if single_thread:
        # N worker processes each with a full rayon pool would oversubscribe the cores.
        os.environ["RAYON_NUM_THREADS"] = "1"


def _encode(texts: list[str], add_eod: bool, tokenizer: str | None = None) -> list[np.ndarray]:
    encs = text_tokenizer(tokenizer).encode_batch_fast(texts, add_special_tokens=False)
    tail = [EOD_ID] if add_eod else []
    return [np.asarray(e.ids + tail, dtype=np.int32) for e in encs]


class _Progress:
    def __init__(self, reader: Reader, total_bytes: int, every_s: float):
        self.reader, self.total_bytes, self.every_s = reader, max(total_bytes, 1), every_s
        self.t0 = self.last = time.perf_counter()

    def maybe_log(self, stats: Stats, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < self.every_s:
            return
        frac = min(self.reader.bytes_read / self.total_bytes, 1.0)
        self.last, dt = now, max(now - self.t0, 1e-9)
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
    files: list[Path] | list[InputPart],
    output_prefix: str,
    text_key: str = "text",
    workers: int = 1,
    batch_size: int = 256,
    add_eod: bool = True,
    log_every_s: float = 10.0,
    tokenizer: str | None = None,
) -> Stats:
    """Tokenise `files` into one shard at `output_prefix`; returns the run's counts.

    `tokenizer` is a tokenizer folder (None: the bundled Qwen2.5 one). Raises ValueError (and leaves
    no shard) when no valid, non-empty document was found.
    """
    stats = Stats(output_prefix=str(output_prefix))
    parts = [f if isinstance(f, InputPart) else InputPart(str(f)) for f in files]
    reader = Reader(text_key, metadata=False)
    progress = _Progress(reader, sum(p.nbytes for p in parts), log_every_s)
    batches = _batches(iter_texts(parts, reader, stats), batch_size, stats)
    t0 = time.perf_counter()
    with IndexedDatasetBuilder(output_prefix, dtype=np.int32) as builder:

        def write(docs: list[np.ndarray]) -> None:
            for d in docs:
                builder.add_document(d)
            stats.documents += len(docs)
            stats.tokens += sum(len(d) for d in docs)
            progress.maybe_log(stats)

        if workers <= 1:
            for batch in batches:  # (the tokenizer loads on the first batch: no valid text fails fast)
                write(_encode(batch, add_eod, tokenizer))
        else:
            import multiprocessing as mp

            # A bounded window of in-flight batches, consumed in submission order: output order is
            # input order, and memory stays flat (Pool.imap would read the whole input ahead).
            with mp.get_context("spawn").Pool(workers, _init_worker, (True,)) as pool:
                pending: collections.deque = collections.deque()
                for batch in batches:
                    pending.append(pool.apply_async(_encode, (batch, add_eod, tokenizer)))
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
    try:
        files = expand_inputs(args.input)
    except FileNotFoundError as e:
        print(f"megaqwen-data tokenize: {e}", file=sys.stderr)
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
        help="jsonl, jsonl.gz, jsonl.zst, parquet files or HF datasets folders (globs allowed, quote them)",
    )
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.stats.json")
    p.add_argument("--text-key", default="text", help="json key / parquet column holding the text")
    p.add_argument("--workers", type=int, default=1, help="tokeniser processes (1: in-process)")
    p.add_argument("--batch-size", type=int, default=256, help="documents per tokeniser call")
    p.add_argument("--no-eod", action="store_true", help="do not append <|endoftext|> to each document")
    p.add_argument("--log-every", type=float, default=10.0, help="seconds between progress lines")
    p.set_defaults(func=run)
