"""The sample order of one shard, built only as far as a run needs (`GPTDataset`'s index arrays).

The order is a function of (shard, seq_len, seed, shuffle) and of the sample index alone:

- Documents: epoch e lays the shard's n documents end to end in the order
  `default_rng([seed, 0, e]).permutation(n)` when n <= MAX_DOCS (2**22); a larger shard uses a keyed
  Feistel permutation of [0, n) (6 rounds of a splitmix64 mix, cycle-walking into range, keys from
  `default_rng([seed, 0, e])`), whose position p -> document is computed for any p without the rest
  of the epoch. The epochs follow each other into one token stream.
- Samples: window w is stream[w*T : w*T + T + 1]; windows are shuffled inside blocks of
  B = min(one epoch's windows, MAX_BLOCK = 2**22) by `default_rng([seed, 1, b]).permutation(B)`.

A shard with at most 2**22 documents and 2**22 windows per epoch (1B tokens at T=256, 17B at T=4096)
therefore keeps exactly the order of the earlier whole-epoch implementation. Above that the run
builds only the blocks it samples from and the documents that cover them (in DOC_CHUNK steps), not
whole epochs, and every prefix is still independent of how many samples were requested.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import numpy as np

from megaqwen.data.index_cache import IndexCache, NpyWriter, cache_key, load_or_build
from megaqwen.data.indexed import idx_path, read_meta

log = logging.getLogger(__name__)

ORDER_VERSION = 1
MAX_BLOCK = 1 << 22  # windows per sample-shuffle block (32 MB of int64 while building one)
MAX_DOCS = 1 << 22  # shards up to this many documents shuffle each epoch with one numpy permutation
DOC_CHUNK = 1 << 20  # documents per build step of a larger shard (~100 MB of temporaries)
_DOCS, _SAMPLES = 0, 1  # rng stream ids: document order per epoch, sample order per block
_ROUNDS = 6
_PROGRESS_S = 10.0


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 (wraps modulo 2**64)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def feistel_permutation(pos: np.ndarray, n: int, keys: np.ndarray) -> np.ndarray:
    """The images of positions `pos` (< n) under a keyed bijection of [0, n): a balanced Feistel
    network on 2h bits (4**h >= n, so at most ~4x the range) and cycle-walking back into [0, n)."""
    half = max((max(n - 1, 1).bit_length() + 1) // 2, 1)
    mask, shift = np.uint64((1 << half) - 1), np.uint64(half)

    def enc(x):
        left, right = x >> shift, x & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        return (left << shift) | right

    out = enc(np.asarray(pos, dtype=np.uint64))
    out_of_range = out >= np.uint64(n)
    while out_of_range.any():
        out[out_of_range] = enc(out[out_of_range])
        out_of_range = out >= np.uint64(n)
    return out.astype(np.int64)


def epoch_chunks(n_docs: int, seed: int, epoch: int, shuffle: bool):
    """Document ids of epoch `epoch` in stream order, in chunks (one chunk when n_docs <= MAX_DOCS)."""
    if n_docs <= MAX_DOCS:
        yield (
            np.random.default_rng([seed, _DOCS, epoch]).permutation(n_docs) if shuffle else np.arange(n_docs)
        )
        return
    keys = np.random.default_rng([seed, _DOCS, epoch]).integers(0, 2**63, size=_ROUNDS, dtype=np.uint64)
    for s in range(0, n_docs, DOC_CHUNK):
        pos = np.arange(s, min(s + DOC_CHUNK, n_docs), dtype=np.int64)
        yield feistel_permutation(pos, n_docs, keys) if shuffle else pos


def shard_tokens(indexed, cache: IndexCache | None = None) -> int:
    """Tokens of a shard: from its sidecar when it describes these documents, else summed over its
    sizes (once, into `cache`, when given: a shard of 9B documents has 36 GB of sizes)."""
    prefix = getattr(indexed, "prefix", None)
    if type(indexed).__name__ == "IndexedDataset" and prefix is not None:
        try:
            meta = read_meta(prefix) or {}
        except ValueError:
            meta = {}
        if meta.get("num_documents") == len(indexed) and isinstance(meta.get("num_tokens"), int):
            return meta["num_tokens"]
    if cache is None:
        return int(indexed.sizes.sum(dtype=np.int64))

    def build(folder: Path) -> list[str]:
        np.save(folder / "tokens.npy", np.array([indexed.sizes.sum(dtype=np.int64)], dtype=np.int64))
        return ["tokens"]

    key = cache_key(kind="tokens", shard=shard_identity(indexed))
    return int(
        load_or_build(cache, prefix, "tokens", key, 1, 1, build, f"{prefix}: token count")["tokens"][0]
    )


def shard_identity(indexed) -> dict:
    """What keys a shard's cached order: its .idx file (path, bytes, mtime) and document selection."""
    base = getattr(indexed, "indexed", None)
    if base is not None:  # a DocumentSubset: its base shard and which documents
        sel = getattr(indexed, "selection", None)
        if sel is None:
            sel = hashlib.sha256(np.ascontiguousarray(indexed.ids).tobytes()).hexdigest()
        return {"base": shard_identity(base), "selection": sel, "docs": len(indexed)}
    p = idx_path(indexed.prefix).resolve()
    st = p.stat()
    return {"idx": str(p), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "docs": len(indexed)}


class OrderPlan:
    """Builds doc_order, doc_start and sample_order for the first `num_windows` windows."""

    def __init__(
        self,
        indexed,
        n_docs: int,
        epoch_tokens: int,
        seq_len: int,
        num_windows: int,
        block: int,
        seed: int,
        shuffle: bool,
    ):
        self.indexed, self.n_docs, self.epoch_tokens = indexed, n_docs, epoch_tokens
        self.seq_len, self.num_windows, self.block = seq_len, num_windows, block
        self.seed, self.shuffle = seed, shuffle
        self.doc_dtype = np.int32 if n_docs < 2**31 else np.int64

    def _write(self, sinks: dict) -> None:
        """Stream the three arrays into `sinks` (objects with `append`)."""
        need = self.num_windows * self.seq_len + 1 if self.num_windows else 0
        sinks["doc_start"].append(np.zeros(1, np.int64))
        covered, epoch, t0, last = 0, 0, time.perf_counter(), time.perf_counter()
        while covered < need:
            for chunk in epoch_chunks(self.n_docs, self.seed, epoch, self.shuffle):
                starts = np.cumsum(self.indexed.sizes[chunk], dtype=np.int64) + covered
                sinks["doc_order"].append(chunk.astype(self.doc_dtype, copy=False))
                sinks["doc_start"].append(starts)
                covered = int(starts[-1]) if len(starts) else covered
                now = time.perf_counter()
                if now - last > _PROGRESS_S:
                    rate = covered / (now - t0)
                    log.info(
                        "sample index %s: documents covering %.3g of %.3g tokens (%.3g tokens/s, ETA %.0f s)",
                        self.indexed.prefix,
                        covered,
                        need,
                        rate,
                        (need - covered) / rate,
                    )
                    last = now
                if covered >= need:
                    break
            epoch += 1
        for b in range(self.num_windows // self.block):
            order = (
                np.random.default_rng([self.seed, _SAMPLES, b]).permutation(self.block)
                if self.shuffle
                else np.arange(self.block)
            )
            sinks["sample_order"].append(order + b * self.block)
            now = time.perf_counter()
            if now - last > _PROGRESS_S:
                log.info(
                    "sample index %s: sample block %d of %d",
                    self.indexed.prefix,
                    b + 1,
                    self.num_windows // self.block,
                )
                last = now

    def build_in_memory(self) -> dict[str, np.ndarray]:
        sinks = {
            "doc_order": _ListSink(self.doc_dtype),
            "doc_start": _ListSink(np.int64),
            "sample_order": _ListSink(np.int64),
        }
        self._write(sinks)
        return {k: v.array() for k, v in sinks.items()}

    def build_into(self, folder: Path) -> list[str]:
        sinks = {
            "doc_order": NpyWriter(folder / "doc_order.npy", self.doc_dtype),
            "doc_start": NpyWriter(folder / "doc_start.npy", np.int64),
            "sample_order": NpyWriter(folder / "sample_order.npy", np.int64),
        }
        try:
            self._write(sinks)
        finally:
            for s in sinks.values():
                s.close()
        return list(sinks)


class _ListSink:
    def __init__(self, dtype):
        self.dtype, self.parts = np.dtype(dtype), []

    def append(self, chunk: np.ndarray) -> None:
        self.parts.append(chunk)

    def array(self) -> np.ndarray:
        return (
            np.concatenate(self.parts).astype(self.dtype, copy=False)
            if self.parts
            else np.zeros(0, self.dtype)
        )


def index_bytes(num_docs: int, num_windows: int) -> int:
    """Bytes of a cached order covering num_docs documents and num_windows windows."""
    return num_docs * (4 if num_docs < 2**31 else 8) + 8 * (num_docs + 1) + 8 * num_windows
