"""Text records -> Qwen2.5 BPE (or any tokenizer folder) -> one Megatron `.bin/.idx` shard.

The core of `megaqwen-data tokenize` and of the trainer's `data.path=sample`; it lives under
`megaqwen.data` so the trainer never imports the curation pipeline (which uses this module).

Every document is tokenised with the Qwen2.5 BPE and ends with `<|endoftext|>` (151643) unless
`add_eod=False`. Control-token strings in the text (a page quoting "<|endoftext|>") are encoded as
ordinary text, so the only EODs in a shard are the appended ones. Input order is kept whatever the
number of workers, so the same inputs always give byte-identical shards. Records are read by
`megaqwen.data.readers.Reader` (malformed lines skipped and counted, invalid UTF-8 and lone surrogates
repaired); a document the tokenizer still rejects is skipped, counted under `failed` and logged with
its file, line and id.

`tokenizer=PATH` takes any Hugging Face tokenizer folder (`megaqwen.tokenizer.open_tokenizer`); its
eos token is then the appended EOD. The shard's PREFIX.shard.json records which tokenizer made it
(name, size, EOD id, fingerprint) and the largest id, which the trainer checks against the model.
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from megaqwen.data.indexed import IndexedDatasetBuilder
from megaqwen.data.readers import InputPart, Reader, TextRecord
from megaqwen.tokenizer import TokenizerInfo

log = logging.getLogger("megaqwen.tokenize")
MAX_LOGGED = 20  # tokenizer failures logged with their source; the rest are counted


@dataclass
class Stats:
    output_prefix: str
    files: int = 0
    documents: int = 0
    tokens: int = 0
    malformed: int = 0
    empty: int = 0  # valid records whose text is "" (skipped: they would be a lone EOD)
    failed: int = 0  # records the tokenizer raised on (skipped, logged with file:line and id)
    repaired: dict[str, int] = field(default_factory=dict)  # invalid_utf8 / lone_surrogate -> records
    seconds: float = 0.0
    malformed_by_file: dict[str, int] = field(default_factory=dict)
    corrupt_files: list[str] = field(default_factory=list)  # compressed streams that ended early / bad
    tokenizer: str = ""  # TokenizerInfo.describe() of the tokenizer used


def write_summary(stats: Stats) -> dict:
    """The run's counts with its token rate, written beside the shard as PREFIX.stats.json."""
    summary = asdict(stats)
    summary["tokens_per_s"] = round(stats.tokens / max(stats.seconds, 1e-9))
    Path(f"{stats.output_prefix}.stats.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def shipped_sample_corpus() -> Path:
    """The multi-domain sample corpus shipped as package data of `megaqwen.data_pipeline`.

    Located through the import system's spec *without importing* that package (layering: the trainer
    and `megaqwen.data` never import the curation pipeline).
    """
    spec = importlib.util.find_spec("megaqwen.data_pipeline")
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    for d in dirs:
        path = Path(d) / "samples" / "corpus.jsonl"
        if path.is_file():
            return path
    raise FileNotFoundError(f"shipped sample corpus not found under {dirs or 'megaqwen.data_pipeline'}; "
                            "reinstall megaqwen")


def iter_records(parts: list[InputPart], reader: Reader, stats: Stats) -> Iterator[TextRecord]:
    """The records of `parts` in order (malformed ones counted by the reader, per file in `stats`)."""
    for part in parts:
        before = reader.malformed
        yield from reader.read(part)
        if reader.malformed > before:
            stats.malformed_by_file[part.path] = (
                stats.malformed_by_file.get(part.path, 0) + reader.malformed - before
            )
        stats.files += 1
        stats.malformed, stats.corrupt_files = reader.malformed, list(reader.corrupt_files)
        stats.repaired = dict(reader.stats.repairs)


def _batches(records: Iterator[TextRecord], size: int, stats: Stats) -> Iterator[list[TextRecord]]:
    batch: list[TextRecord] = []
    for r in records:
        if not r.text:
            stats.empty += 1
            continue
        batch.append(r)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@functools.lru_cache(maxsize=2)
def _text_tokenizer(path: str | None) -> tuple[Any, TokenizerInfo]:
    from megaqwen.tokenizer import open_tokenizer

    tok, info = open_tokenizer(path)
    backend = tok.backend_tokenizer
    backend.encode_special_tokens = True
    return backend, info


def text_tokenizer(path: str | None = None):
    """The `tokenizers.Tokenizer` for document text (loaded once per process and path).

    Control-token strings in the text are encoded as ordinary text (a literal "<|endoftext|>" is
    not a document boundary), so token counts taken with it match the shards exactly.
    """
    return _text_tokenizer(path)[0]


def text_tokenizer_info(path: str | None = None) -> TokenizerInfo:
    """What identifies the tokenizer `text_tokenizer(path)` encodes with (recorded in the shard)."""
    return _text_tokenizer(path)[1]


def _init_worker() -> None:
    # N worker processes each with a full rayon pool would oversubscribe the cores.
    os.environ["RAYON_NUM_THREADS"] = "1"


def encode_texts(
    texts: list[str], add_eod: bool, tokenizer: str | None = None
) -> list[np.ndarray | str]:
    """int32 token arrays, or for a text the tokenizer raised on, the error message (str).

    The batch call is tried first; only when it raises are the texts encoded one by one, so one bad
    document costs its own slot, not the batch's.
    """
    tok, info = _text_tokenizer(tokenizer)
    tail = [info.eod_id] if add_eod else []
    try:
        encs = tok.encode_batch_fast(texts, add_special_tokens=False)
        return [np.asarray(e.ids + tail, dtype=np.int32) for e in encs]
    except Exception:  # noqa: BLE001 - isolate the document that fails, below
        out: list[np.ndarray | str] = []
        for t in texts:
            try:
                out.append(np.asarray(tok.encode(t, add_special_tokens=False).ids + tail, dtype=np.int32))
            except Exception as e:  # noqa: BLE001 - counted and logged by the caller
                out.append(f"{type(e).__name__}: {e}")
        return out


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
    files: list[Path] | list[str] | list[InputPart],
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
    no shard) when no valid, non-empty document was found, or when EODs are asked for and the
    tokenizer has no eos token.
    """
    if batch_size < 1 or workers < 1:
        raise ValueError(f"batch_size ({batch_size}) and workers ({workers}) must be >= 1")
    info = text_tokenizer_info(tokenizer)  # loads it here: a wrong folder fails before any reading
    if add_eod and info.eod_id is None:
        raise ValueError(f"tokenizer {info.path} has no eos token to end documents with: set eos_token in "
                         "its tokenizer_config.json, or tokenise without EODs (--no-eod)")
    stats = Stats(output_prefix=str(output_prefix), tokenizer=info.describe())
    parts = [f if isinstance(f, InputPart) else InputPart(str(f)) for f in files]
    reader = Reader(text_key, metadata=False)
    progress = _Progress(reader, sum(p.nbytes for p in parts), log_every_s)
    batches = _batches(iter_records(parts, reader, stats), batch_size, stats)
    t0 = time.perf_counter()
    meta = {"tokenizer": info.to_dict(), "add_eod": add_eod}
    with IndexedDatasetBuilder(output_prefix, dtype=np.int32, meta=meta) as builder:

        def write(batch: list[TextRecord], encoded: list[np.ndarray | str]) -> None:
            for rec, d in zip(batch, encoded):
                if isinstance(d, str):
                    stats.failed += 1
                    if stats.failed <= MAX_LOGGED:
                        log.warning("%s (id %s): tokenizer failed, document skipped: %s",
                                    rec.source, rec.id, d)
                    continue
                builder.add_document(d)
                stats.documents += 1
                stats.tokens += len(d)
            progress.maybe_log(stats)

        if workers <= 1:
            for batch in batches:
                write(batch, encode_texts([r.text for r in batch], add_eod, tokenizer))
        else:
            import multiprocessing as mp

            # A bounded window of in-flight batches, consumed in submission order: output order is
            # input order, and memory stays flat (Pool.imap would read the whole input ahead).
            with mp.get_context("spawn").Pool(workers, _init_worker) as pool:
                pending: collections.deque = collections.deque()
                for batch in batches:
                    texts = [r.text for r in batch]
                    pending.append((batch, pool.apply_async(encode_texts, (texts, add_eod, tokenizer))))
                    if len(pending) >= 2 * workers:
                        b, res = pending.popleft()
                        write(b, res.get())
                while pending:
                    b, res = pending.popleft()
                    write(b, res.get())
        if stats.documents == 0:
            raise ValueError(
                f"no valid document in {len(files)} input file(s) ({stats.malformed} malformed, "
                f"{stats.empty} empty, {stats.failed} rejected by the tokenizer); nothing written to "
                f"{output_prefix}"
            )
    stats.seconds = round(time.perf_counter() - t0, 3)
    progress.maybe_log(stats, force=True)
    return stats
