"""Near-dedup that scales out: MinHash LSH as three stages over the pipeline's executors.

`dedup.band_tasks > 0` replaces the single in-memory dedup task (`steps/dedup.find_duplicates`)
with (layout in `lsh_files.py`):

1. dedup_bands (one task per input part): the filter stage's signatures re-laid out per LSH band:
   per document (band key, global id, hash of the whole signature), sorted by key; plus the exact
   keys as one more unit, and the signatures as a memory-mappable `.npy`.
2. dedup_buckets (`band_tasks` tasks, each a contiguous share of the units): merges its units'
   sorted files one key range at a time (at most `dedup.bucket_chunk_docs` entries, 24 B each, in
   memory), and emits the pairs that share a bucket, verified on the full signatures (read by row
   from the memory-mapped `.npy`): estimated Jaccard >= threshold, as the single task checks.
3. dedup (one task): the single task's greedy walk over the verified pairs (below), writing each
   input part's removal list; judge / annotate then drop those documents as they read the part.

Same kept set, and the same removal records, as the single task, which walks documents in global
order and removes one (a) whose exact key was seen before, else (b) that shares an LSH bucket with
an already *kept* document at estimated Jaccard >= threshold, pointing at the smallest such one.
That is the first-in-order greedy independent set of the verified-pair graph, not its connected
components (a ~ b ~ c with a !~ c keeps a and c), so the last stage replays it: documents in order,
each removed iff an earlier verified neighbour is kept. Only documents with an earlier neighbour
are visited; the rest are kept.

Why documents with identical signatures are collapsed ("alias" pairs): a bucket of k identical
documents would give k(k-1)/2 pairs; instead the first of them pairs with the others in the bucket
and each later copy is paired only with that first one. A later copy is never kept by the single
task (its twin, or the kept document that removed its twin, has the same buckets and Jaccard), and
it removes nothing, so the walk resolves it as its twin's removal (or to the twin when it is kept).
Exact copies (same normalised text, so the same shingles and signature) are removed as "exact"
first, as today.

Memory: a bucket task holds one key range of one band (`bucket_chunk_docs` x 24 B, sorted in
place) plus its candidate pairs (16 B each) and blocks of 2 x 65536 signature rows for the check;
never the corpus. The last stage holds the verified pairs (16 B each, x3 while sorting) and a dict
entry per document that has an earlier neighbour (~200 B): O(duplicates), not O(documents).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from megaqwen.data_pipeline import lsh_files as lf
from megaqwen.data_pipeline.config import PipelineConfig
from megaqwen.data_pipeline.document import StepStats
from megaqwen.data_pipeline.executor import load_markers, report_progress
from megaqwen.data_pipeline.io import expand_inputs

SIGHASH_SEED = 1 << 20  # seed of the whole-signature hash; bands use their index
VERIFY_BLOCK = 65536  # candidate pairs checked at once: 2 x 65536 x 112 x 8 B = 117 MB of rows
_NO_PAIRS = np.zeros((0, 2), np.int64)


def _n_parts(cfg: PipelineConfig) -> int:
    return len(expand_inputs(cfg.input.paths, cfg.input.parts_per_file))


def all_units(cfg: PipelineConfig) -> list[str]:
    d = cfg.dedup
    return lf.units(d.exact, d.minhash, d.num_bands)


# ---------------------------------------------------------------- 1. dedup_bands (per input part)
def bands_task(cfg: PipelineConfig, task: int) -> dict[str, Any]:
    d, out = cfg.dedup, cfg.out
    path = out / "signatures" / f"{task:05d}.npz"
    z = lf.load_npz(path, "filter", ("exact", "sig"))
    exact_N, sig_NP = z["exact"], z["sig"]
    n = len(exact_N)
    if d.minhash and sig_NP.shape != (n, d.num_perm):
        raise lf.CorruptFile(
            f"{path}: signatures of shape {sig_NP.shape}, expected ({n}, {d.num_perm}) "
            f"(num_bands x rows_per_band); rerun the filter stage with --rerun"
        )
    gid_N = lf.gid(task, np.arange(n))
    if d.exact:
        _save_sorted(
            lf.band_path(out, "exact", task), exact_N.astype(np.uint64), gid_N, np.zeros(n, np.uint64)
        )
    if d.minhash:
        lf.save_npy(lf.sig_path(out, task), np.ascontiguousarray(sig_NP, np.uint64))
        sighash_N = lf.row_hash(sig_NP, SIGHASH_SEED)
        r = d.rows_per_band
        for b in range(d.num_bands):
            key_N = lf.row_hash(sig_NP[:, b * r : (b + 1) * r], b)
            _save_sorted(lf.band_path(out, f"b{b:02d}", task), key_N, gid_N, sighash_N)
    report_progress(n, 0, 0)
    return {"task": task, "documents": n}


def _save_sorted(path: Path, key_N: np.ndarray, gid_N: np.ndarray, sighash_N: np.ndarray) -> None:
    rec = np.empty(len(key_N), lf.BAND_DTYPE)
    rec["key"], rec["gid"], rec["sighash"] = key_N, gid_N, sighash_N
    rec = rec[np.lexsort((rec["gid"], rec["sighash"], rec["key"]))]
    lf.save_npy(path, rec)


# ---------------------------------------------------------------- 2. dedup_buckets (per unit share)
class _Meter:
    """Bytes of the arrays a task holds at once (deterministic, unlike RSS) and in total."""

    def __init__(self) -> None:
        self.peak = self.total = 0

    def hold(self, *arrays: np.ndarray) -> None:
        b = sum(a.nbytes for a in arrays)
        self.peak, self.total = max(self.peak, b), self.total + b


def buckets_task(cfg: PipelineConfig, task: int) -> dict[str, Any]:
    d, out = cfg.dedup, cfg.out
    n_parts = _n_parts(cfg)
    mine = lf.units_of_task(all_units(cfg), d.band_tasks, task)
    merge, check = _Meter(), _Meter()
    exact, alias, cand = [_NO_PAIRS], [_NO_PAIRS], [_NO_PAIRS]
    chunks = 0
    for unit in mine:
        files = [
            lf.load_npy(lf.band_path(out, unit, t), "dedup_bands", lf.BAND_DTYPE, 1) for t in range(n_parts)
        ]
        rows = sum(len(f) for f in files)
        n_chunks = max(1, math.ceil(rows / d.bucket_chunk_docs))
        # keys are uniform 64-bit hashes: equal key ranges hold about equal shares
        edges = [int(i * (1 << 64) // n_chunks) for i in range(n_chunks)]
        cuts = [np.searchsorted(f["key"], np.array(edges, np.uint64)).tolist() + [len(f)] for f in files]
        for c in range(n_chunks):
            rec = np.concatenate([f[cut[c] : cut[c + 1]] for f, cut in zip(files, cuts)])
            rec = rec[np.lexsort((rec["gid"], rec["sighash"], rec["key"]))]
            if unit == "exact":
                e, a, p = _exact_pairs(rec), _NO_PAIRS, _NO_PAIRS
            else:
                e, (a, p) = _NO_PAIRS, _band_pairs(rec)
            merge.hold(rec, rec, e, a, p)  # the sort holds a second copy
            exact.append(e)
            alias.append(a)
            cand.append(p)
            chunks += 1
            report_progress(len(rec), 0, 0)
    cand_M2 = _unique_pairs(np.concatenate(cand))
    alias_A2 = _unique_pairs(np.concatenate(alias))
    near_M2 = _verify(cfg, cand_M2, check, identical=False)
    _verify(cfg, alias_A2, check, identical=True)
    exact_E2 = np.concatenate(exact)
    lf.save_npz(lf.pairs_path(out, task), exact=exact_E2, alias=alias_A2, near=near_M2)
    return {
        "task": task,
        "units": mine,
        "chunks": chunks,
        "exact_pairs": len(exact_E2),
        "alias_pairs": len(alias_A2),
        "candidate_pairs": len(cand_M2),
        "near_pairs": len(near_M2),
        "peak_bytes": max(merge.peak, check.peak),
        "merge_peak_bytes": merge.peak,
        "verify_peak_bytes": check.peak,
        "loaded_bytes": merge.total + check.total,
    }


def _starts(*cols: np.ndarray) -> np.ndarray:
    """(R,) bool: row starts a run of equal values in all `cols` (sorted records)."""
    same = np.zeros(len(cols[0]), bool)
    same[1:] = True
    for c in cols:
        same[1:] &= c[1:] == c[:-1]
    return ~same


def _run_first(new_R: np.ndarray, gid_R: np.ndarray) -> np.ndarray:
    """Each row's run's first gid (rows sorted with gid last, so the smallest)."""
    return gid_R[np.maximum.accumulate(np.where(new_R, np.arange(len(new_R)), 0))]


def _exact_pairs(rec: np.ndarray) -> np.ndarray:
    """(E, 2) (first, later) for every later document with an earlier one's exact key."""
    new = _starts(rec["key"])
    return np.stack([_run_first(new, rec["gid"])[~new], rec["gid"][~new]], 1)


def _band_pairs(rec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(alias (A, 2), candidates (M, 2)) of one band's sorted records; pairs are (earlier, later)."""
    new_sig = _starts(rec["key"], rec["sighash"])
    alias = np.stack([_run_first(new_sig, rec["gid"])[~new_sig], rec["gid"][~new_sig]], 1)
    reps = rec[new_sig]  # one per distinct signature in each bucket
    new_key = _starts(reps["key"])
    start = np.flatnonzero(new_key)
    end = np.append(start[1:], len(reps))
    size = end - start
    row_end = np.repeat(end, size)  # each rep pairs with the reps after it in its bucket
    count = row_end - np.arange(len(reps)) - 1
    left = np.repeat(np.arange(len(reps)), count)
    offset = np.arange(len(left)) - np.repeat(np.cumsum(count) - count, count)
    right = left + 1 + offset
    g = reps["gid"]
    cand = np.stack([np.minimum(g[left], g[right]), np.maximum(g[left], g[right])], 1)
    return alias, cand


def _unique_pairs(p_M2: np.ndarray) -> np.ndarray:
    return np.unique(p_M2, axis=0) if len(p_M2) else _NO_PAIRS


class _Signatures:
    """Rows of the per-part signature files, memory-mapped on first use."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg, self.maps = cfg, {}

    def rows(self, gid_B: np.ndarray) -> np.ndarray:  # (B, num_perm)
        task_B, pos_B = lf.split_gid(gid_B)
        out = np.empty((len(gid_B), self.cfg.dedup.num_perm), np.uint64)
        for t in np.unique(task_B).tolist():
            if t not in self.maps:
                p = lf.sig_path(self.cfg.out, t)
                self.maps[t] = lf.load_npy(p, "dedup_bands", np.dtype(np.uint64), 2, self.cfg.dedup.num_perm)
            m = task_B == t
            out[m] = self.maps[t][pos_B[m]]
        return out


def _verify(cfg: PipelineConfig, pairs_M2: np.ndarray, meter: _Meter, identical: bool) -> np.ndarray:
    """The candidate pairs that the single task would match: estimated Jaccard >= threshold (as
    `LeanMinHash.jaccard`) and one band equal row for row (a key-hash collision is no bucket).
    `identical`: alias pairs, whose whole-signature hashes are equal, must have equal signatures."""
    d = cfg.dedup
    sigs = _Signatures(cfg)
    keep = []
    for s in range(0, len(pairs_M2), VERIFY_BLOCK):
        blk = pairs_M2[s : s + VERIFY_BLOCK]
        a_BP, b_BP = sigs.rows(blk[:, 0]), sigs.rows(blk[:, 1])
        meter.hold(a_BP, b_BP, pairs_M2)
        eq_BP = a_BP == b_BP
        if identical:
            bad = ~eq_BP.all(1)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise RuntimeError(
                    f"documents {lf.split_gid(blk[i])} have different MinHash signatures with the same "
                    f"64-bit signature hash (a 2^-64 event, or corrupt files under {cfg.out / 'dedup_lsh'})"
                )
            continue
        jac_B = np.count_nonzero(eq_BP, 1).astype(np.float64) / float(d.num_perm)
        band_B = eq_BP.reshape(len(blk), d.num_bands, d.rows_per_band).all(2).any(1)
        keep.append(blk[(jac_B >= d.threshold) & band_B])
    return np.concatenate(keep) if keep else _NO_PAIRS


# ---------------------------------------------------------------- 3. dedup: the greedy walk
def clusters_task(cfg: PipelineConfig, task: int) -> dict[str, Any]:
    d, out = cfg.dedup, cfg.out
    n_parts = _n_parts(cfg)
    counts = {m["task"]: m["documents"] for m in load_markers(out, "dedup_bands")}
    n_docs = sum(counts[t] for t in range(n_parts))
    parts = [
        lf.load_npz(lf.pairs_path(out, t), "dedup_buckets", ("exact", "alias", "near"))
        for t in range(d.band_tasks)
    ]
    exact_E2 = np.concatenate([p["exact"] for p in parts])
    alias_A2 = _unique_pairs(np.concatenate([p["alias"] for p in parts]))
    near_M2 = _unique_pairs(np.concatenate([p["near"] for p in parts]))
    removed: dict[int, tuple[int, str]] = dict(
        zip(exact_E2[:, 1].tolist(), zip(exact_E2[:, 0].tolist(), ["exact"] * len(exact_E2)))
    )
    n_exact = len(removed)
    # an exact copy takes no part in the near pass (as in the single task); by construction it is
    # never a bucket's first copy, so this only drops its own alias pairs
    if n_exact:
        ex = np.fromiter(removed, np.int64, n_exact)
        alias_A2 = alias_A2[~np.isin(alias_A2[:, 1], ex)]
        near_M2 = near_M2[~(np.isin(near_M2[:, 0], ex) | np.isin(near_M2[:, 1], ex))]
    twin = dict(zip(alias_A2[:, 1].tolist(), alias_A2[:, 0].tolist()))
    order = np.lexsort((near_M2[:, 0], near_M2[:, 1]))
    later, earlier = near_M2[order, 1], near_M2[order, 0]
    first = np.flatnonzero(np.r_[True, later[1:] != later[:-1]]) if len(later) else np.zeros(0, np.int64)
    neighbours = dict(zip(later[first].tolist(), np.split(earlier, first[1:]) if len(first) else []))
    for i in sorted(set(twin) | set(neighbours)):
        if i in twin:
            a = twin[i]
            removed[i] = (removed[a][0] if a in removed else a, "near")
            continue
        kept = [j for j in neighbours[i].tolist() if j not in removed]  # ascending
        if kept:
            removed[i] = (kept[0], "near")
    by_task: dict[int, list[list]] = {t: [] for t in range(n_parts)}
    for i in sorted(removed):
        j, kind = removed[i]
        (ti, pi), (tj, pj) = (lf.split_gid(np.int64(x)) for x in (i, j))
        by_task[int(ti)].append([int(pi), [int(tj), int(pj)], kind])
    for t, recs in by_task.items():
        p = lf.removals_path(out, t)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(recs))
        tmp.replace(p)
    return {
        "task": task,
        "documents": n_docs,
        "removed": len(removed),
        "steps": [s.to_json() for s in _stats(cfg, n_docs, n_exact, len(removed) - n_exact)],
        "pairs": {"exact": len(exact_E2), "alias": len(alias_A2), "near": len(near_M2)},
    }


def _stats(cfg: PipelineConfig, n_docs: int, n_exact: int, n_near: int) -> list[StepStats]:
    """The single task's stats for the same removals."""
    ex = StepStats("exact_dedup", seen=n_docs, kept=n_docs - n_exact, removed=n_exact)
    if n_exact:
        ex.reasons["exact_dedup:duplicate"] = n_exact
    if not cfg.dedup.minhash:
        return [ex]
    seen = n_docs - n_exact
    mh = StepStats("minhash_dedup", seen=seen, kept=seen - n_near, removed=n_near)
    if n_near:
        mh.reasons["minhash_dedup:near_duplicate"] = n_near
    return [ex, mh]


def read_removals(cfg: PipelineConfig, task: int) -> list[list]:
    """Input part `task`'s removal records `[position, [task, position] kept, kind]`."""
    p = lf.removals_path(cfg.out, task)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise RuntimeError(f"{p} is missing: run the dedup stage first") from None
    except json.JSONDecodeError as e:
        raise lf.CorruptFile(f"{p}: not valid JSON ({e}); rerun the dedup stage with --rerun") from None
