"""Heuristic filters + MinHash dedup throughput: megaqwen's pipeline vs DataTrove, same data, same run.

    python benchmarks/bench_data_pipeline.py [--size-mb 100] [--workers 2] [--files 4]
    python benchmarks/bench_data_pipeline.py --stages [--copies 20] [--config sample]

`--stages`: every stage of a pipeline config (default: the shipped sample config) timed end to end
(process start-up included) with documents/s per stage; `--copies N` feeds N near-copies of the
sample corpus instead (dedup off, so every copy reaches annotation: a corpus-scale rate).

The sample corpus is replicated to ~SIZE MB (each copy has one word changed per document, so the
copies are near- but not exact duplicates and every document goes through MinHash), split into
FILES jsonl files. Both frameworks run Gopher repetition + Gopher quality + C4 (no terminal-punct
line rule, no curly-bracket rule) + FineWeb filters, then MinHash signatures (5-grams, 14 bands x
8 rows) and clustering; DataTrove with its LocalPipelineExecutor (signature, buckets, cluster
stages), megaqwen with its filter + dedup stages. Prints docs/s per core and the ratio.
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

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data_pipeline" / "samples" / "corpus.jsonl"
FILTERS = [
    {"name": "normalize"},
    {"name": "gopher_repetition"},
    {"name": "gopher_quality"},
    {"name": "c4", "filter_no_terminal_punct": False, "filter_curly_bracket": False},
    {"name": "fineweb"},
]


def make_input(folder: Path, size_mb: float, files: int) -> tuple[int, int]:
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    good = []
    for line in lines:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and isinstance(r.get("text"), str):
            good.append(r)
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    outs = [open(folder / f"part-{i:03d}.jsonl", "w", encoding="utf-8") for i in range(files)]  # noqa: SIM115
    n = written = copy = 0
    while written < size_mb * 1e6:
        for r in good:
            words = r["text"].split(" ")
            words[rng.randrange(len(words))] = f"variant{copy}"
            line = json.dumps({"id": f"{r['id']}-c{copy}", "text": " ".join(words)}) + "\n"
            outs[n % files].write(line)
            written += len(line.encode())
            n += 1
        copy += 1
    for f in outs:
        f.close()
    return n, written


def run_megaqwen(inp: Path, out: Path, workers: int) -> dict:
    from megaqwen.data_pipeline.config import PipelineConfig
    from megaqwen.data_pipeline.executor import load_markers
    from megaqwen.data_pipeline.pipeline import run_stage

    cfg = PipelineConfig()
    cfg.input.paths = [str(inp / "*.jsonl")]
    cfg.output_dir, cfg.workers, cfg.keep_removed, cfg.steps = str(out), workers, False, FILTERS
    t0 = time.perf_counter()
    run_stage(cfg, "filter", progress=False)
    t1 = time.perf_counter()
    run_stage(cfg, "dedup", progress=False)
    t2 = time.perf_counter()
    kept = sum(m["kept"] for m in load_markers(cfg.out, "filter"))
    dd = load_markers(cfg.out, "dedup")[0]
    return {
        "filter_s": t1 - t0,
        "dedup_s": t2 - t1,
        "seconds": t2 - t0,
        "after_filters": kept,
        "after_dedup": kept - dd["removed"],
    }


def run_datatrove(inp: Path, out: Path, workers: int, files: int) -> dict:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupSignature
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    # sha1 shingle hashes like datasketch's default (DataTrove 0.10.1's xxhash path passes str to
    # xxhash, which the installed xxhash rejects)
    mh = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8, hash_config=HashConfig(64, "sha1"))
    t0 = time.perf_counter()
    LocalPipelineExecutor(
        pipeline=[
            JsonlReader(str(inp)),
            GopherRepetitionFilter(),
            GopherQualityFilter(),
            C4QualityFilter(filter_no_terminal_punct=False, filter_curly_bracket=False),
            FineWebQualityFilter(),
            JsonlWriter(str(out / "filtered")),
            MinhashDedupSignature(str(out / "sigs"), config=mh),
        ],
        tasks=files,
        workers=workers,
        logging_dir=str(out / "logs1"),
    ).run()
    t1 = time.perf_counter()
    LocalPipelineExecutor(
        pipeline=[MinhashDedupBuckets(str(out / "sigs"), str(out / "buckets"), config=mh)],
        tasks=mh.num_buckets,
        workers=workers,
        logging_dir=str(out / "logs2"),
    ).run()
    LocalPipelineExecutor(
        pipeline=[MinhashDedupCluster(str(out / "buckets"), str(out / "remove"), config=mh)],
        tasks=1,
        workers=1,
        logging_dir=str(out / "logs3"),
    ).run()
    t2 = time.perf_counter()
    import gzip

    kept = 0
    for f in (out / "filtered").glob("*.jsonl.gz"):
        with gzip.open(f) as fh:
            kept += sum(1 for _ in fh)
    removed = sum(os.path.getsize(f) // 4 for f in (out / "remove").glob("*.remove"))  # uint32 doc indices
    return {
        "filter_s": t1 - t0,
        "dedup_s": t2 - t1,
        "seconds": t2 - t0,
        "after_filters": kept,
        "after_dedup": kept - removed,
    }


def stage_docs(stage: str, markers: list[dict]) -> int:
    """Documents a stage took in, from its markers."""
    if stage == "filter":
        return sum(m["steps"][0]["seen"] for m in markers)
    if stage == "dedup":
        return markers[0]["documents"] if markers else 0
    if stage == "train_domains":
        return markers[0].get("teacher_labels", 0) if markers else 0
    if stage in ("annotate", "shards"):
        return sum(m["steps"][0]["seen"] for m in markers)
    return 0


def run_stages(config: str, out: Path, copies: int, workers: int | None) -> dict:
    from megaqwen.data_pipeline.config import load_config
    from megaqwen.data_pipeline.executor import load_markers
    from megaqwen.data_pipeline.pipeline import enabled_stages, run_stage

    cfg = load_config(config, {"output_dir": str(out)})
    if workers:
        cfg.workers = workers
    if copies > 1:
        n, _ = make_input(out / "input", CORPUS.stat().st_size * copies / 1e6, 4)
        cfg.input.paths, cfg.input.parts_per_file = [str(out / "input" / "*.jsonl")], 1
        cfg.dedup.exact = cfg.dedup.minhash = False
    res = {}
    for stage in enabled_stages(cfg):
        t0 = time.perf_counter()
        run_stage(cfg, stage, progress=False)
        dt = time.perf_counter() - t0
        n = stage_docs(stage, load_markers(cfg.out, stage))
        res[stage] = {"seconds": round(dt, 2), "docs": n, "docs_per_s": round(n / dt, 1) if n else None}
        print(f"{stage:14s} {dt:8.2f} s  {n:7d} docs  " + (f"{n / dt:8.1f} docs/s" if n else ""), flush=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=float, default=100)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--tmp", default=None, help="scratch folder (default: a temporary one, removed after)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--stages", action="store_true", help="time every stage of --config instead")
    p.add_argument("--config", default="sample", help="--stages: pipeline config (name or path)")
    p.add_argument("--copies", type=int, default=1, help="--stages: near-copies of the sample corpus")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    root = Path(args.tmp or tempfile.mkdtemp(prefix="bench_dp_"))
    if args.stages:
        try:
            res = run_stages(args.config, root / "out", args.copies, args.workers)
            if args.json:
                Path(args.json).write_text(json.dumps(res, indent=1))
        finally:
            if not args.tmp:
                shutil.rmtree(root, ignore_errors=True)
        return
    try:
        n, size = make_input(root / "input", args.size_mb, args.files)
        print(f"input: {n} documents, {size / 1e6:.1f} MB in {args.files} files; {args.workers} workers")
        ours = run_megaqwen(root / "input", root / "megaqwen", args.workers)
        dt = run_datatrove(root / "input", root / "datatrove", args.workers, args.files)
        res = {
            "documents": n,
            "mb": round(size / 1e6, 1),
            "workers": args.workers,
            "megaqwen": ours,
            "datatrove": dt,
        }
        for name, r in (("megaqwen", ours), ("datatrove", dt)):
            r["docs_per_s_per_core"] = n / r["seconds"] / args.workers
            print(
                f"{name:10s} filter {r['filter_s']:7.1f} s  dedup {r['dedup_s']:6.1f} s  "
                f"total {r['seconds']:7.1f} s  {r['docs_per_s_per_core']:8.0f} docs/s/core"
            )
        res["ratio_megaqwen_over_datatrove"] = ours["docs_per_s_per_core"] / dt["docs_per_s_per_core"]
        print(f"megaqwen / datatrove throughput: {res['ratio_megaqwen_over_datatrove']:.2f}x")
        for name, r in (("megaqwen", ours), ("datatrove", dt)):
            print(f"{name:10s} kept {r['after_filters']} after filters, {r['after_dedup']} after dedup")
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    finally:
        if not args.tmp:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
