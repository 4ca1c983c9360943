"""Near-dedup that scales out: MinHash LSH as three stages over the pipeline's executors.

`dedup.band_tasks > 0` replaces the single in-memory dedup task (`steps/dedup.find_duplicates`)
with (layout in `lsh_files.py`):

1. dedup_bands (one task per input part): the filter stage's signatures re-laid out per LSH band:
   per document (band key, global id, hash of the whole signature), sorted by key; plus the exact
   keys as one more unit, and the signatures as a memory-mappable `.npy`.
2. dedup_buckets (`band_tasks` x `key_splits` tasks, each a contiguous share of the units and a
   1/key_splits share of their key space): merges its units' sorted files one key range at a time
   (at most `dedup.bucket_chunk_docs` entries, 24 B each, in memory), and emits the pairs that
   share a bucket, verified on the full signatures (read by row from the memory-mapped `.npy`):
   estimated Jaccard >= threshold, as the single task checks. A pair sharing several bands is
   emitted by the lowest one only, so no pair is written twice.
3. dedup (one task): the single task's greedy walk over the verified pairs (`greedy_walk`,
   vectorised), writing each input part's removal list; judge / annotate then drop those
   documents as they read the part.

Same kept set, and the same removal records, as the single task, which walks documents in global
order and removes one (a) whose exact key was seen before, else (b) that shares an LSH bucket with
an already *kept* document at estimated Jaccard >= threshold, pointing at the smallest such one.
That is the first-in-order greedy independent set of the verified-pair graph, not its connected
components (a ~ b ~ c with a !~ c keeps a and c), so the last stage replays it: documents in order,
each removed iff an earlier verified neighbour is kept. Only documents in a verified pair take part;
the rest are kept.

Why documents with identical signatures are collapsed ("alias" pairs): a bucket of k identical
documents would give k(k-1)/2 pairs; instead the first of them pairs with the others in the bucket
and each later copy is paired only with that first one. A later copy is never kept by the single
task (its twin, or the kept document that removed its twin, has the same buckets and Jaccard), and
it removes nothing, so the walk resolves it as its twin's removal (or to the twin when it is kept).
Exact copies (same normalised text, so the same shingles and signature) are removed as "exact"
first, as today.

Memory: a bucket task holds one key range of one band (`bucket_chunk_docs` x 24 B, sorted with a
copy), that range's candidate pairs (16 B each), blocks of 2 x 16384 signature rows for the check,
and the verified pairs it outputs (its 1/(band_tasks x key_splits) share of the duplicates); never
the corpus. The last stage holds the verified pairs (16 B each, a few copies while sorting)
and ~30 B per document in a pair: O(duplicates), not O(documents).
"""

from __future__ import annotations

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
VERIFY_BLOCK = 16384  # candidate pairs checked at once: 2 x 16384 x 112 x 8 B = 29 MB of rows
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
    mine = lf.units_of_task(all_units(cfg), d.band_tasks, task // d.key_splits)
    # this task's share of each unit's key space; keys are uniform 64-bit hashes, so equal key
    # ranges hold about equal numbers of documents
    split = task % d.key_splits
    lo, hi = split * (1 << 64) // d.key_splits, (split + 1) * (1 << 64) // d.key_splits
    merge, check = _Meter(), _Meter()
    exact = [_NO_PAIRS]
    # pairs already found by an earlier unit (a near pair shares several bands) are not checked
    # again; these are outputs anyway. A rejected candidate is checked again in each band it shares.
    alias_A2, near_M2 = _NO_PAIRS, _NO_PAIRS
    chunks = checked = 0
    for unit in mine:
        files = [
            lf.load_npy(lf.band_path(out, unit, t), "dedup_bands", lf.BAND_DTYPE, 1) for t in range(n_parts)
        ]
        ends = [_cut(f, lo) for f in files], [_cut(f, hi) for f in files]
        rows = sum(e - s for s, e in zip(*ends))
        n_chunks = max(1, math.ceil(rows / d.bucket_chunk_docs))
        edges = [lo + i * (hi - lo) // n_chunks for i in range(n_chunks)] + [hi]
        cuts = [[_cut(f, e) for e in edges] for f in files]
        alias, near = [alias_A2], [near_M2]
        for c in range(n_chunks):
            rec = np.concatenate([f[cut[c] : cut[c + 1]] for f, cut in zip(files, cuts)])
            rec = rec[np.lexsort((rec["gid"], rec["sighash"], rec["key"]))]
            if unit == "exact":
                exact.append(_exact_pairs(rec))
                merge.hold(rec, rec, exact[-1])  # the sort holds a second copy
            else:
                a, p = _band_pairs(rec)
                if unit != "b00":  # identical signatures share every band: band 0 emits them
                    a = _NO_PAIRS
                p = p[~_isin_pairs(p, near_M2)]
                merge.hold(rec, rec, a, p)
                _verify(cfg, a, check, band=None)
                alias.append(a)
                near.append(_verify(cfg, p, check, band=int(unit[1:])))
                checked += len(p)
            chunks += 1
            report_progress(len(rec), 0, 0)
        alias_A2, near_M2 = _unique_pairs(np.concatenate(alias)), _unique_pairs(np.concatenate(near))
    exact_E2 = np.concatenate(exact)
    lf.save_npz(lf.pairs_path(out, task), exact=exact_E2, alias=alias_A2, near=near_M2)
    return {
        "task": task,
        "units": mine,
        "key_range": [lo, hi],
        "chunks": chunks,
        "exact_pairs": len(exact_E2),
        "alias_pairs": len(alias_A2),
        "checked_pairs": checked,
        "near_pairs": len(near_M2),
        "peak_bytes": max(merge.peak, check.peak),
        "merge_peak_bytes": merge.peak,
        "verify_peak_bytes": check.peak,
        "loaded_bytes": merge.total + check.total,
    }


def _cut(f: np.ndarray, key: int) -> int:
    """Index of the first record with key >= `key` (2^64: the end) in key-sorted records."""
    return len(f) if key >= 1 << 64 else int(np.searchsorted(f["key"], np.uint64(key)))


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


def _as_rows(p_M2: np.ndarray) -> np.ndarray:
    """(M,) 16-byte items, one per pair: equal pairs are equal items (for unique / isin)."""
    return np.ascontiguousarray(p_M2, np.int64).view("V16").ravel()


def _unique_pairs(p_M2: np.ndarray) -> np.ndarray:
    """Distinct pairs (in byte order; callers order by gid themselves)."""
    return np.unique(_as_rows(p_M2)).view(np.int64).reshape(-1, 2) if len(p_M2) else _NO_PAIRS


def _isin_pairs(p_M2: np.ndarray, q_Q2: np.ndarray) -> np.ndarray:
    if not len(p_M2) or not len(q_Q2):
        return np.zeros(len(p_M2), bool)
    return np.isin(_as_rows(p_M2), _as_rows(q_Q2))


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


def _verify(cfg: PipelineConfig, pairs_M2: np.ndarray, meter: _Meter, band: int | None) -> np.ndarray:
    """The candidate pairs that the single task would match: estimated Jaccard >= threshold (as
    `LeanMinHash.jaccard`) whose lowest band equal row for row is `band`, the band that proposed
    them. `band=None`: alias pairs (equal whole-signature hashes), which must have equal signatures."""
    d = cfg.dedup
    keep = []
    for s in range(0, len(pairs_M2), VERIFY_BLOCK):
        blk = pairs_M2[s : s + VERIFY_BLOCK]
        sigs = _Signatures(cfg)  # mapped again per block: resident file pages stay one block's
        a_BP, b_BP = sigs.rows(blk[:, 0]), sigs.rows(blk[:, 1])
        del sigs
        meter.hold(a_BP, b_BP, pairs_M2)
        eq_BP = a_BP == b_BP
        if band is None:
            bad = ~eq_BP.all(1)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise RuntimeError(
                    f"documents {lf.split_gid(blk[i])} have different MinHash signatures with the same "
                    f"64-bit signature hash (a 2^-64 event, or corrupt files under {cfg.out / 'dedup_lsh'})"
                )
            continue
        jac_B = np.count_nonzero(eq_BP, 1).astype(np.float64) / float(d.num_perm)
        # the lowest band the two share row for row emits the pair, so each pair leaves exactly one
        # bucket task (a band key collision without equal rows is no bucket)
        same_BK = eq_BP.reshape(len(blk), d.num_bands, d.rows_per_band).all(2)
        first_B = np.where(same_BK.any(1), same_BK.argmax(1), -1)
        keep.append(blk[(jac_B >= d.threshold) & (first_B == band)])
    return np.concatenate(keep) if keep else _NO_PAIRS


# ---------------------------------------------------------------- 3. dedup: the greedy walk
KINDS = ("exact", "near")


def clusters_task(cfg: PipelineConfig, task: int) -> dict[str, Any]:
    d, out = cfg.dedup, cfg.out
    n_parts = _n_parts(cfg)
    counts = {m["task"]: m["documents"] for m in load_markers(out, "dedup_bands")}
    n_docs = sum(counts[t] for t in range(n_parts))
    # every pair comes from exactly one bucket task (exact: the exact unit; alias: band 0; near: the
    # lowest band the pair shares), so the files only need concatenating
    parts = [
        lf.load_npz(lf.pairs_path(out, t), "dedup_buckets", ("exact", "alias", "near"))
        for t in range(d.band_tasks * d.key_splits)
    ]
    exact_E2, alias_A2, near_M2 = (np.concatenate([p[k] for p in parts]) for k in ("exact", "alias", "near"))
    del parts
    # an exact copy takes no part in the near pass (as in the single task); by construction it is
    # never a bucket's first copy, so this only drops its own alias pairs
    ex = np.sort(exact_E2[:, 1])
    if len(ex):
        alias_A2 = alias_A2[~np.isin(alias_A2[:, 1], ex)]
        near_M2 = near_M2[~(np.isin(near_M2[:, 0], ex) | np.isin(near_M2[:, 1], ex))]
    near_gid, near_ptr, rounds = greedy_walk(near_M2)
    # a later copy of an identical signature goes where its first copy went (or to it, when kept)
    at = np.minimum(np.searchsorted(near_gid, alias_A2[:, 0]), max(len(near_gid) - 1, 0))
    twin_removed = near_gid[at] == alias_A2[:, 0] if len(near_gid) else np.zeros(len(alias_A2), bool)
    alias_ptr = np.where(twin_removed, near_ptr[at] if len(near_ptr) else 0, alias_A2[:, 0])
    gid_R = np.concatenate([exact_E2[:, 1], near_gid, alias_A2[:, 1]])
    ptr_R = np.concatenate([exact_E2[:, 0], near_ptr, alias_ptr])
    kind_R = np.repeat(np.array([0, 1, 1], np.uint8), [len(exact_E2), len(near_gid), len(alias_A2)])
    order = np.argsort(gid_R, kind="stable")
    gid_R, ptr_R, kind_R = gid_R[order], ptr_R[order], kind_R[order]
    if len(gid_R) and np.any(gid_R[1:] == gid_R[:-1]):
        raise RuntimeError(
            f"a document is removed twice: the pair files under {out / 'dedup_lsh'} are inconsistent"
        )
    task_R, pos_R = lf.split_gid(gid_R)
    kept_task_R, kept_pos_R = lf.split_gid(ptr_R)
    bounds = np.searchsorted(task_R, np.arange(n_parts + 1))
    for t in range(n_parts):
        sl = slice(bounds[t], bounds[t + 1])
        rec = np.empty(bounds[t + 1] - bounds[t], lf.REMOVAL_DTYPE)
        rec["pos"], rec["kept_task"], rec["kept_pos"], rec["kind"] = (
            pos_R[sl],
            kept_task_R[sl],
            kept_pos_R[sl],
            kind_R[sl],
        )
        lf.save_npy(lf.removals_path(out, t), rec)
    n_exact, n_near = len(exact_E2), len(near_gid) + len(alias_A2)
    return {
        "task": task,
        "documents": n_docs,
        "removed": n_exact + n_near,
        "steps": [s.to_json() for s in _stats(cfg, n_docs, n_exact, n_near)],
        "pairs": {"exact": len(exact_E2), "alias": len(alias_A2), "near": len(near_M2)},
        "walk_rounds": rounds,
    }


def greedy_walk(pairs_M2: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """The single task's decisions on the verified pairs (earlier gid, later gid): walking documents
    in order, one is removed iff an earlier neighbour is kept, pointing at the smallest kept one.

    Vectorised in rounds: every undecided document whose earlier neighbours are all decided decides
    at once (the smallest undecided one always can, so each round decides at least one). Rounds =
    the longest chain of documents waiting on each other (a few on real duplicate clusters);
    each round costs the pairs still undecided. Returns (removed gids ascending, their kept gid,
    rounds)."""
    if not len(pairs_M2):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    nodes, inv = np.unique(pairs_M2, return_inverse=True)  # compact ids keep the order
    j_M, i_M = inv.reshape(pairs_M2.shape).T
    status = np.zeros(len(nodes), np.int8)  # 0 undecided, 1 kept, 2 removed
    none = len(nodes)
    ptr = np.full(len(nodes), none)
    rounds = 0
    while len(i_M):
        rounds += 1
        blocked = np.zeros(len(nodes), bool)
        blocked[i_M[status[j_M] == 0]] = True
        ready = (status == 0) & ~blocked
        by_kept = (status[j_M] == 1) & ready[i_M]
        best = np.full(len(nodes), none)
        np.minimum.at(best, i_M[by_kept], j_M[by_kept])
        removed = ready & (best < none)
        status[removed], ptr[removed] = 2, best[removed]
        status[ready & ~removed] = 1
        live = status[i_M] == 0
        j_M, i_M = j_M[live], i_M[live]
    gone = np.flatnonzero(status == 2)
    return nodes[gone], nodes[ptr[gone]], rounds


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


def read_removals(cfg: PipelineConfig, task: int) -> np.ndarray:
    """Input part `task`'s removals (REMOVAL_DTYPE: position, kept document's task and position,
    kind 0 exact / 1 near), by position."""
    return lf.load_npy(lf.removals_path(cfg.out, task), "dedup", lf.REMOVAL_DTYPE, 1, mmap=False)


def removal_records(cfg: PipelineConfig, task: int) -> list[list]:
    """The same as the single task's `duplicates.json` entry: `[[position, [task, position], kind]]`."""
    return [
        [int(r["pos"]), [int(r["kept_task"]), int(r["kept_pos"])], KINDS[int(r["kind"])]]
        for r in read_removals(cfg, task)
    ]
