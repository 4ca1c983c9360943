"""Near-dedup that scales out (issue 28): the distributed MinHash LSH stages against the single
in-memory dedup task, on the same synthetic signatures; docs/s per core and memory per task of each
stage at 1, 4 and 14 bucket tasks, the check that every run removes exactly what the single task
removes, and the extrapolation to 9B documents on N nodes.

    nice -n 10 python benchmarks/bench_dedup.py [--docs 200000] [--parts 16] [--cores-per-node 64]

Signatures are synthetic (what the filter stage stores): 68% distinct documents, 8% exact copies,
4% copies with the same words and other punctuation (same signature, other exact key) and 20%
near variants of an earlier document or variant (chains), each with 0-40 of its 112 MinHash values
redrawn (estimated Jaccard 0.64-1), shuffled over `parts` input parts. The signing itself (the
filter stage's datasketch MinHash, the same in both designs) is timed on real text separately.

Every task runs in a forked child: memory is its peak resident set above its start (VmHWM after
clearing it), plus the bytes of the arrays the task holds at once (`peak_bytes` in its marker).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from megaqwen.data_pipeline import lsh_files as lf
from megaqwen.data_pipeline import lsh_stages as lsh
from megaqwen.data_pipeline import stages as st
from megaqwen.data_pipeline.config import PipelineConfig
from megaqwen.data_pipeline.steps.dedup import DedupConfig, Signer

MIB = 2**20


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def in_child(fn, *args):
    """(result, seconds, peak RSS growth in bytes) of fn(*args) run in a forked child."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            start = _rss_kib("VmRSS")
            t0 = time.perf_counter()
            res = fn(*args)
            dt = time.perf_counter() - t0
            out = json.dumps([res, dt, (_rss_kib("VmHWM") - start) * 1024], default=str)
        except BaseException as e:  # noqa: BLE001 - reported by the parent
            out = json.dumps(["error", repr(e)])
        with os.fdopen(w, "w") as f:
            f.write(out)
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        data = json.loads(f.read())
    os.waitpid(pid, 0)
    if data[0] == "error":
        raise RuntimeError(f"{fn.__name__}{args[1:]}: {data[1]}")
    return data


def sign_rate(n: int = 1500, words: int = 400) -> float:
    """Documents/s per core of the filter stage's MinHash signing (5-gram shingles, 112 perms)."""
    rng = random.Random(0)
    vocab = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(20000)
    ]
    texts = [" ".join(rng.choice(vocab) for _ in range(words)) for _ in range(n)]
    signer = Signer(DedupConfig())
    t0 = time.perf_counter()
    for t in texts:
        signer.signature(t)
    return n / (time.perf_counter() - t0)


def make_signatures(out: Path, n_docs: int, n_parts: int, seed: int = 0) -> None:
    """signatures/<part>.npz as the filter stage writes them, plus filter markers and input stubs."""
    rng = np.random.default_rng(seed)
    perm = DedupConfig().num_perm
    kind = rng.choice(4, n_docs, p=[0.68, 0.08, 0.04, 0.20])  # distinct, exact, same-sig, variant
    kind[0] = 0
    sig = np.empty((n_docs, perm), np.uint64)
    exact = rng.integers(0, 2**63, n_docs, dtype=np.int64).astype(np.uint64)
    distinct = kind == 0
    sig[distinct] = rng.integers(0, 2**32, (int(distinct.sum()), perm), dtype=np.int64).astype(np.uint64)
    last_distinct = np.maximum.accumulate(np.where(distinct, np.arange(n_docs), 0))
    for i in np.flatnonzero(~distinct):  # each copies a random earlier document (chains through variants)
        src = int(rng.integers(0, i)) if rng.random() < 0.5 else int(last_distinct[i])
        sig[i] = sig[src]
        if kind[i] == 1:
            exact[i] = exact[src]
        elif kind[i] == 3:
            k = int(rng.integers(0, 41))
            sig[i, rng.choice(perm, k, replace=False)] = rng.integers(0, 2**32, k, dtype=np.int64).astype(
                np.uint64
            )
    part = rng.integers(0, n_parts, n_docs)
    for t in range(n_parts):
        idx = np.flatnonzero(part == t)
        idx = idx[rng.permutation(len(idx))]
        lf.save_npz(out / "signatures" / f"{t:05d}.npz", exact=exact[idx], sig=sig[idx])
        (out / "markers" / "filter").mkdir(parents=True, exist_ok=True)
        (out / "markers" / "filter" / f"{t:05d}.json").write_text(json.dumps({"task": t}))
        (out / "in").mkdir(exist_ok=True)
        (out / "in" / f"{t:05d}.jsonl").write_text('{"text": "stub"}\n')


def config(out: Path, band_tasks: int) -> PipelineConfig:
    cfg = PipelineConfig(output_dir=str(out))
    cfg.input.paths = [str(out / "in" / "*.jsonl")]
    cfg.dedup.band_tasks = band_tasks
    return cfg


def run_stage(fn, cfg: PipelineConfig, n_tasks: int, marker_stage: str | None = None) -> dict:
    secs, rss, arrays, results = [], [], [], []
    for t in range(n_tasks):
        res, dt, grow = in_child(fn, cfg, t)
        secs.append(dt)
        rss.append(grow)
        arrays.append(res.get("peak_bytes", 0))
        results.append(res)
        if marker_stage:
            p = cfg.out / "markers" / marker_stage / f"{t:05d}.json"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(res))
    return {
        "sum_s": sum(secs),
        "max_s": max(secs),
        "rss": max(rss),
        "arrays": max(arrays),
        "results": results,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=200_000)
    ap.add_argument("--parts", type=int, default=16)
    ap.add_argument("--band-tasks", type=int, nargs="+", default=[1, 4, 14])
    ap.add_argument("--cores-per-node", type=int, default=64)
    ap.add_argument("--target-docs", type=float, default=9e9)
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_dedup_"))
    shutil.rmtree(work, ignore_errors=True)
    n = a.docs
    print("signing rate (filter stage, datasketch, 400-word documents): ", end="", flush=True)
    sign = sign_rate()
    print(f"{sign:.0f} docs/s per core")
    t0 = time.perf_counter()
    make_signatures(work, n, a.parts)
    print(f"{n} synthetic signatures in {a.parts} parts written in {time.perf_counter() - t0:.1f} s ({work})")

    base = config(work, 0)
    res, single_s, single_rss = in_child(st.dedup_task, base, 0)
    want = json.loads((work / "dedup" / "duplicates.json").read_text())
    print(f"single task: {single_s:.1f} s, +{single_rss / MIB:.0f} MiB, removed {res['removed']}", flush=True)

    rows = [
        (
            "single in-memory task (today)",
            1,
            n / single_s,
            single_s,
            single_rss,
            n * (perm_bytes := 112 * 8 + 8),
        )
    ]
    bands = run_stage(lsh.bands_task, config(work, 1), a.parts, "dedup_bands")
    rows.append(
        ("dedup_bands (per input part)", a.parts, n / bands["sum_s"], bands["max_s"], bands["rss"], None)
    )
    walk = {}
    for k in a.band_tasks:
        cfg = config(work, k)
        bk = run_stage(lsh.buckets_task, cfg, k)
        rows.append(
            (f"dedup_buckets, band_tasks={k}", k, n / bk["sum_s"], bk["max_s"], bk["rss"], bk["arrays"])
        )
        cl_res, cl_s, cl_rss = in_child(lsh.clusters_task, cfg, 0)
        walk[k] = (cl_s, cl_rss, cl_res)
        got = {str(t): lsh.removal_records(cfg, t) for t in range(a.parts)}
        same = {t: v for t, v in got.items() if v} == want
        rows.append((f"dedup (greedy walk), band_tasks={k}", 1, n / cl_s, cl_s, cl_rss, None))
        print(
            f"band_tasks={k}: removed {cl_res['removed']}, pairs {cl_res['pairs']}, walk rounds "
            f"{cl_res['walk_rounds']}; same removals as the single task: {same}",
            flush=True,
        )
        if not same:
            raise SystemExit("distributed dedup removed other documents than the single task")

    print(f"\n{n} documents, {a.parts} input parts, 14 bands x 8 rows, threshold 0.75 (1 core per task)\n")
    print(
        "| stage | tasks | docs/s per core | slowest task (s) | peak RSS growth per task (MiB) "
        "| arrays held per task (MiB) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, tasks, rate, mx, rss, arr in rows:
        arr_s = f"{arr / MIB:.1f}" if arr else "-"
        print(f"| {name} | {tasks} | {rate:,.0f} | {mx:.2f} | {rss / MIB:.1f} | {arr_s} |")

    # ---- extrapolation: stage core-seconds scale with documents; bucket memory is bounded by
    # bucket_chunk_docs, the walk's by the duplicate pairs (scaled linearly here)
    N = a.target_docs
    k = max(walk)
    bk_rate = next(r[2] for r in rows if r[0] == f"dedup_buckets, band_tasks={k}")
    cl_s, cl_rss, cl_res = walk[k]
    pair_bytes = 16 * sum(cl_res["pairs"].values())
    print(
        f"\nExtrapolation to {N:.0e} documents, {a.cores_per_node} cores per node (linear in documents; "
        f"same duplicate mix):\n"
    )
    print(
        "| nodes | signing (filter) h | dedup_bands h | dedup_buckets h (tasks = 15 x key_splits) | "
        "dedup walk h (1 process) | single task h |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for nodes in (1, 8, 64):
        cores = nodes * a.cores_per_node
        print(
            f"| {nodes} | {N / sign / cores / 3600:.1f} | {N / rows[1][2] / cores / 3600:.2f} | "
            f"{N / bk_rate / cores / 3600:.2f} | {cl_s * N / n / 3600:.1f} | {N / rows[0][2] / 3600:.0f} |"
        )
    cd = DedupConfig().bucket_chunk_docs
    print(
        f"\nMemory at {N:.0e} documents: single task ~{single_rss / n * N / 2**40:.1f} TiB in one process; "
        f"bucket task <= {cd * 48 / MIB:.0f} MiB of band entries (bucket_chunk_docs={cd:,} x 24 B, x2 "
        f"while sorting) + {2 * lsh.VERIFY_BLOCK * 112 * 8 / MIB:.0f} MiB of signature rows per "
        f"verification block, whatever the corpus; walk (one process): {pair_bytes / n * N / 2**30:.0f} "
        f"GiB of verified pairs, peak RSS {cl_rss / max(pair_bytes, 1):.0f}x that here "
        f"(~{cl_rss / max(pair_bytes, 1) * pair_bytes / n * N / 2**30:.0f} GiB)."
    )
    print(
        f"Disk: signatures {perm_bytes - 8} B/doc ({(perm_bytes - 8) * N / 2**40:.1f} TiB) + band files "
        f"{15 * 24} B/doc ({15 * 24 * N / 2**40:.1f} TiB)."
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
