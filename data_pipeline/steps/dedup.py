"""Exact and MinHash near-duplicate detection (MinHash and LSH from `datasketch`).

Two phases, so that many tasks can sign documents in parallel: each filter task stores an exact
hash and a MinHash signature per kept document; one dedup task then walks all documents in
global order (task, position) and removes any document whose exact hash was seen before, or whose
LSH candidates include an already-kept document with estimated Jaccard >= `threshold`. The first
occurrence is always the one kept, so the result does not depend on the number of workers.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH

from megaqwen.data_pipeline.document import StepStats

_WORD = re.compile(r"\w+")
SCHEME = "affine32"  # datasketch >= 2 default; stored signatures only compare within one scheme


@dataclass
class DedupConfig:
    exact: bool = True
    """remove documents whose normalised text (lower case, single spaces) was seen before."""
    minhash: bool = True
    """remove near-duplicates by MinHash LSH."""
    ngram: int = 5
    """word n-gram size of the shingles (FineWeb/DataTrove use 5)."""
    num_bands: int = 14
    """LSH bands b; with r rows the detection curve is centred near (1/b)^(1/r) = 0.72."""
    rows_per_band: int = 8
    """LSH rows r per band; the signature has b * r = 112 permutations."""
    threshold: float = 0.75
    """an LSH candidate is a duplicate when its estimated Jaccard similarity is at least this."""
    seed: int = 1
    """seed of the MinHash permutations (must be the same in every task)."""
    storage_config: dict[str, Any] = field(default_factory=lambda: {"type": "dict"})
    """datasketch LSH storage; {"type": "redis", ...} keeps the index out of memory on big corpora."""
    band_tasks: int = 0
    """0: one in-memory dedup task (fine to ~10M documents); 1..num_bands: distributed LSH stages
    (dedup_bands, dedup_buckets with this many tasks, dedup), same kept set (data_pipeline/lsh_stages.py)."""
    key_splits: int = 1
    """distributed: each band's key space is split over this many bucket tasks (band_tasks x key_splits
    tasks in all), so the bucket stage can use more than num_bands cores; same result."""
    bucket_chunk_docs: int = 4_000_000
    """distributed: most band entries (24 B each) a bucket task sorts at once; a larger band is merged
    in key ranges of this size, so its memory never grows with the corpus."""

    @property
    def num_perm(self) -> int:
        return self.num_bands * self.rows_per_band


def exact_key(text: str) -> int:
    """64-bit hash of the text, lower-cased with whitespace collapsed."""
    norm = " ".join(text.lower().split()).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(norm, digest_size=8).digest(), "little")


def shingles(text: str, n: int) -> set[bytes]:
    words = _WORD.findall(text.lower())
    if len(words) < n:
        return {" ".join(words).encode("utf-8")}
    return {" ".join(words[i : i + n]).encode("utf-8") for i in range(len(words) - n + 1)}


class Signer:
    """MinHash signatures with one set of permutations shared by all documents (computing them is
    the slow part of `MinHash()`)."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg
        self._template = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, scheme=SCHEME)

    def signature(self, text: str) -> np.ndarray:  # (num_perm,) uint64
        m = MinHash(
            num_perm=self.cfg.num_perm,
            seed=self.cfg.seed,
            permutations=self._template.permutations,
            scheme=SCHEME,
        )
        m.update_batch(list(shingles(text, self.cfg.ngram)))
        return m.hashvalues.astype(np.uint64)


def find_duplicates(
    exact: np.ndarray, sigs: np.ndarray, cfg: DedupConfig
) -> tuple[dict[int, tuple[int, str]], list[StepStats]]:
    """Duplicates among documents 0..N-1 in that (global) order.

    exact: (N,) uint64 exact keys; sigs: (N, num_perm) uint64 MinHash signatures.
    Returns {removed index: (kept index, "exact" | "near")} and the stats of both passes.
    """
    n = len(exact)
    removed: dict[int, tuple[int, str]] = {}
    ex_stats, mh_stats = StepStats("exact_dedup"), StepStats("minhash_dedup")
    first: dict[int, int] = {}
    for i in range(n):
        ex_stats.seen += 1
        j = first.setdefault(int(exact[i]), i) if cfg.exact else i
        if j != i:
            removed[i] = (j, "exact")
            ex_stats.remove("exact_dedup:duplicate")
        else:
            ex_stats.kept += 1
    if not cfg.minhash:
        return removed, [ex_stats]
    lsh = MinHashLSH(
        num_perm=cfg.num_perm, params=(cfg.num_bands, cfg.rows_per_band), storage_config=cfg.storage_config
    )
    kept: dict[int, LeanMinHash] = {}
    for i in range(n):
        if i in removed:
            continue
        mh_stats.seen += 1
        m = LeanMinHash(seed=cfg.seed, hashvalues=sigs[i], scheme=SCHEME)
        matches = sorted(int(c) for c in lsh.query(m) if kept[int(c)].jaccard(m) >= cfg.threshold)
        if matches:
            removed[i] = (matches[0], "near")
            mh_stats.remove("minhash_dedup:near_duplicate")
        else:
            kept[i] = m
            lsh.insert(i, m)
            mh_stats.kept += 1
    return removed, [ex_stats, mh_stats]
