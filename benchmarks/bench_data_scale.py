"""Sample-index cost at scale: build time, cache on disk, resident memory per rank, start-up time.

Synthetic shards (a real Megatron .idx written by `megaqwen.data.indexed.write_index`, a sparse .bin
made with truncate, so 400B tokens cost ~2 GB of disk) of growing size, blended from several sources.
Each measurement runs in a fresh process; memory is VmHWM (peak resident set) minus that of a process
that only imported the same modules, i.e. what the indexes cost a rank.

    first start    build_dataset(..., cache=IndexCache(fresh folder)): the builder's build + mmap
    second start   the same in a new process: the cached entries are reused (what every other rank
                   and every restart pays)
    old            the implementation before the cache (whole epochs of every source, in memory per
                   rank), from git, for the sizes where it fits (--old)

Then the extrapolation to an 18T-token, 10-source blend at 4K and 32K from the measured rates.

    python benchmarks/bench_data_scale.py --sizes 4 40 400 --old --out /tmp/dscale
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MEAN_DOC_TOKENS = 2000  # the shard: 20M documents, 40B tokens


def write_shard(prefix: Path, n_docs: int, seed: int) -> int:
    from megaqwen.data.indexed import write_index

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.geometric(1 / MEAN_DOC_TOKENS, n_docs), 2, 2**31 - 1).astype(np.int32)
    write_index(f"{prefix}.idx", lengths, np.int32)
    tokens = int(lengths.sum(dtype=np.int64))
    with open(f"{prefix}.bin", "wb") as f:
        f.truncate(tokens * 4)  # sparse: reads give token 0
    return tokens


def make_blend(folder: Path, billions: int, sources: int) -> tuple[str, int]:
    folder.mkdir(parents=True, exist_ok=True)
    recipe = folder / "blend.json"
    if recipe.exists():
        return str(recipe), json.loads((folder / "tokens.json").read_text())
    per_source = billions * 10**9 // sources // MEAN_DOC_TOKENS
    tokens = sum(write_shard(folder / f"src{k}", per_source, k) for k in range(sources))
    weights = [round(1 / (k + 2), 3) for k in range(sources)]
    spec = {
        "name": f"{billions}B",
        "datasets": [{"prefix": f"src{k}", "weight": w} for k, w in enumerate(weights)],
    }
    recipe.write_text(json.dumps(spec))
    (folder / "tokens.json").write_text(json.dumps(tokens))
    return str(recipe), tokens


def vm_hwm_gib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20


def child(spec: dict) -> dict:
    """One measurement in this (fresh) process."""
    import torch  # noqa: F401  (the trainer has it loaded: part of the baseline, not of the indexes)

    from megaqwen.data.blend import build_dataset
    from megaqwen.data.index_cache import IndexCache

    if spec["mode"] == "baseline":
        return {"hwm_gib": vm_hwm_gib()}
    t0 = time.perf_counter()
    if spec["mode"] == "old":
        sys.path.insert(0, spec["old_dir"])
        import old_blend

        ds = old_blend.build_dataset(spec["recipe"], seq_len=spec["seq_len"], num_samples=spec["samples"])
    else:
        cache = IndexCache(spec["cache"])
        ds = build_dataset(spec["recipe"], seq_len=spec["seq_len"], num_samples=spec["samples"], cache=cache)
    build_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    first = [ds[i]["tokens"] for i in range(spec["samples"])]  # the first steps' samples
    return {"build_s": build_s, "read_s": time.perf_counter() - t1, "hwm_gib": vm_hwm_gib(), "n": len(first)}


def run_child(spec: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if out.returncode:
        raise RuntimeError(f"child {spec['mode']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def old_implementation(folder: Path) -> str:
    """dataset.py and blend.py before the index cache (git rev 09f1b25~1), importable as old_blend."""
    folder.mkdir(parents=True, exist_ok=True)
    repo = Path(__file__).resolve().parents[1]
    show = lambda p: (
        subprocess.run(
            ["git", "-C", str(repo), "show", f"09f1b25~1:{p}"],
            capture_output=True,  # noqa: E731
            text=True,
            check=True,
        ).stdout
    )
    (folder / "old_dataset.py").write_text(show("megaqwen/data/dataset.py"))
    (folder / "old_blend.py").write_text(
        show("megaqwen/data/blend.py").replace("from megaqwen.data.dataset import", "from old_dataset import")
    )
    return str(folder)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--sizes", type=int, nargs="+", default=[4, 40, 400], help="blend sizes, billions of tokens"
    )
    ap.add_argument(
        "--sources", type=int, nargs="+", default=None, help="sources per size (default 1 up to 40B, else 4)"
    )
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--samples", type=int, default=16, help="samples the run needs (2 steps of 8)")
    ap.add_argument("--old", action="store_true", help="also measure the pre-cache implementation (<= 40B)")
    ap.add_argument("--out", default=None, help="folder for the shards (kept: reruns reuse them)")
    ap.add_argument(
        "--train-check",
        default=None,
        metavar="PREFIX",
        help="instead: 2 ranks x 2 steps of the debug model at seq_len 256 on the shipped sample, "
        "then twice on PREFIX (first start builds the cache, second reuses it)",
    )
    ap.add_argument(
        "--compare-old",
        action="store_true",
        help="instead: check that shards under the 2**22 thresholds give the old implementation's "
        "samples bit for bit (shipped sample, a 3-source blend)",
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    out = Path(args.out or tempfile.mkdtemp(prefix="dscale-"))
    if args.compare_old:
        compare_old(out)
        return
    if args.train_check:
        train_check(args.train_check, out)
        return
    sources = args.sources or [1 if b <= 40 else 4 for b in args.sizes]
    base = run_child({"mode": "baseline"})["hwm_gib"]
    old_dir = old_implementation(out / "old") if args.old else None
    rows = []
    print(f"baseline process (python + torch + megaqwen.data): {base:.3f} GiB VmHWM", flush=True)
    for billions, n_src in zip(args.sizes, sources):
        t0 = time.perf_counter()
        recipe, tokens = make_blend(out / f"{billions}B", billions, n_src)
        print(
            f"{billions}B: {tokens / 1e9:.1f}B tokens in {n_src} sources ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        cache = out / f"{billions}B" / f"cache-{args.seq_len}"
        if cache.exists():
            shutil.rmtree(cache)
        spec = {"recipe": recipe, "seq_len": args.seq_len, "samples": args.samples, "cache": str(cache)}
        first = run_child({**spec, "mode": "cache"})
        second = run_child({**spec, "mode": "cache"})
        row = {
            "tokens_B": tokens / 1e9,
            "sources": n_src,
            "build_s": first["build_s"],
            "cache_MB": dir_bytes(cache) / 1e6,
            "first_gib": first["hwm_gib"] - base,
            "restart_s": second["build_s"],
            "restart_gib": second["hwm_gib"] - base,
        }
        if old_dir and billions <= 40:
            old = run_child({**spec, "mode": "old", "old_dir": old_dir})
            row.update(old_s=old["build_s"], old_gib=old["hwm_gib"] - base)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print_table(rows, args.seq_len, args.samples)
    extrapolate(rows)


def print_table(rows: list[dict], seq_len: int, samples: int) -> None:
    print(f"\n{samples} samples of {seq_len} tokens (2 steps); memory = VmHWM above the baseline process")
    print(
        "| tokens | sources | first start: build s | cache on disk | first start GiB | restart s "
        "| restart GiB | old: s | old GiB/rank |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        old = f"{r['old_s']:.1f} | {r['old_gib']:.2f}" if "old_s" in r else "- | -"
        print(
            f"| {r['tokens_B']:.0f}B | {r['sources']} | {r['build_s']:.2f} | {r['cache_MB']:.0f} MB | "
            f"{r['first_gib']:.3f} | {r['restart_s']:.2f} | {r['restart_gib']:.3f} | {old} |"
        )


def extrapolate(rows: list[dict]) -> None:
    """18T tokens, 10 sources, 4K and 32K: a short run (one 2**22-window block per source) and the whole
    18T-token run (every window once), from the formulas of `sample_order.index_bytes` and the measured
    build rate of the largest size."""
    from megaqwen.data.sample_order import MAX_BLOCK, index_bytes

    big = rows[-1]
    rate = big["cache_MB"] * 1e6 / max(big["build_s"], 1e-9)  # index bytes written per second
    total, sources, docs_per_token = 18e12, 10, 1 / MEAN_DOC_TOKENS
    print(
        "\nextrapolation: 18T tokens, 10 sources, 2000-token documents (9B documents); build rate "
        f"{rate / 1e6:.0f} MB/s of index (measured at {big['tokens_B']:.0f}B); old = whole epochs per rank"
    )
    print(
        "| seq_len | run | windows | cache on disk | build (one process) | resident per rank "
        "| old: per rank |"
    )
    print("|---|---|---|---|---|---|---|")
    for seq in (4096, 32768):
        windows_all = int(total / seq)
        old = index_bytes(int(total * docs_per_token), windows_all)  # the old code: whole epochs, every rank
        short_windows = sources * MAX_BLOCK
        short_docs = int(short_windows * seq * docs_per_token)
        for name, w, d in (
            ("2 steps", short_windows, short_docs),
            ("all 18T", windows_all, int(total * docs_per_token)),
        ):
            b = index_bytes(d, w)
            print(
                f"| {seq} | {name} | {w:.3g} | {b / 1e9:.1f} GB | {b / rate / 60:.1f} min | "
                f"O(pages touched): {big['restart_gib']:.2f} GiB measured | {old / 2**30:.0f} GiB |"
            )


def compare_old(out: Path) -> None:
    """Every sample of a few runs under the thresholds equals the pre-cache implementation's."""
    import torch

    from megaqwen.data.blend import build_dataset
    from megaqwen.data.index_cache import IndexCache
    from megaqwen.data.indexed import IndexedDatasetBuilder
    from megaqwen.data.tokenize import shipped_sample_corpus, tokenize_files

    sys.path.insert(0, old_implementation(out / "old"))
    import old_blend

    tokenize_files([shipped_sample_corpus()], str(out / "sample"))
    rng = np.random.default_rng(0)
    for k in range(3):
        with IndexedDatasetBuilder(out / f"small{k}") as b:
            for _ in range(3000 + 500 * k):
                b.add_document(rng.integers(0, 1000, rng.integers(1, 400)).tolist() + [151643])
    blend = [str(out / f"small{k}") for k in range(3)]
    for src, n, seq in [(str(out / "sample"), 640, 256), (str(out / "sample"), 4096, 64), (blend, 3000, 128)]:
        a = old_blend.build_dataset(src, seq_len=seq, num_samples=n, seed=1234)
        b = build_dataset(
            src, seq_len=seq, num_samples=n, seed=1234, cache=IndexCache(str(out / "cmp-cache"))
        )
        same = all(torch.equal(a[i][k], b[i][k]) for i in range(n) for k in a[i])
        name = "3-source blend" if isinstance(src, list) else "shipped sample"
        print(f"{name}, seq_len {seq}, {n} samples: all equal to the old implementation: {same}", flush=True)


def train_check(prefix: str, out: Path) -> None:
    """The issue's check: per-rank peak memory and start-up on a big shard vs the shipped sample."""
    repo = Path(__file__).resolve().parents[1]
    shutil.rmtree(Path(prefix).parent / "index-cache", ignore_errors=True)
    print("| data | wall s | peak GiB rank 0 | peak GiB rank 1 | data_time_s / step_time_s | index cache |")
    print("|---|---|---|---|---|---|")
    for k, (name, path) in enumerate(
        [
            ("shipped sample", "sample"),
            (f"{prefix} (first start)", prefix),
            (f"{prefix} (second start)", prefix),
        ]
    ):
        run = out / f"train-{k}"
        shutil.rmtree(run, ignore_errors=True)
        cmd = [
            str(repo / "launch" / "torchrun.sh"),
            "--nproc-per-node",
            "2",
            "model=debug",
            f"data.path={path}",
            "train.seq_len=256",
            "train.steps=2",
            f"train.out_dir={run}",
            "logger.wandb.enabled=false",
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        logs = proc.stdout + proc.stderr
        cache = ", ".join(w for w in ("built", "reused") if f"index cache: {w}" in logs) or "-"
        frac = sum(r["data_time_s"] for r in rows) / sum(r["step_time_s"] for r in rows)
        print(
            f"| {name} | {wall:.0f} | {max(r['peak_mem_gib/rank0'] for r in rows):.3f} | "
            f"{max(r['peak_mem_gib/rank1'] for r in rows):.3f} | {frac:.3f} | {cache} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
