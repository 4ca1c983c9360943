"""Long-sequence forward+backward of the debug model under context parallelism, on CPU (gloo).

    python benchmarks/bench_context_parallel.py                        # 8K, 16K, 32K, 64K at cp=2 ring
    python benchmarks/bench_context_parallel.py --lengths 8192 --modes ring,alltoall --baseline

Each row is one forward+backward of one (1, T) sequence of the debug model (vocab 1024) in fresh
processes (peak RSS only grows within one): `cp` ranks of one thread each, the sequence zig-zag
sharded, the attention core swapped for `mode`. Reported per rank (worst rank): peak RSS (VmHWM,
not ru_maxrss, which Linux carries over fork) and its growth above the RSS after the model and
inputs are built, and the wall time of forward+backward. `--baseline` adds the single process
with the plain model (SDPA: flash-style causal kernel on CPU without documents; with `--doc-len`
packed documents it builds the (T, T) mask, so keep it to short T) as the named baseline of the
ratio columns. `--doc-len N` packs documents of N tokens on average (0: one document, causal).
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status_gib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 2**20
    raise RuntimeError(f"no {key} in /proc/self/status")


def _batch(t: int, doc_len: int, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, t + 1), generator=g)
    if doc_len:
        docs = (torch.rand(1, t, generator=g) < 1 / doc_len).long().cumsum(1)
    else:
        docs = torch.zeros(1, t, dtype=torch.long)
    starts = torch.ones_like(docs, dtype=torch.bool)
    starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
    idx = torch.arange(t).expand_as(docs)
    pos = idx - torch.where(starts, idx, 0).cummax(1).values
    return {"tokens": ids[:, :-1], "labels": ids[:, 1:], "position_ids": pos, "document_ids": docs}


def _worker(rank: int, world: int, port: int, t: int, mode: str, doc_len: int, tile: int, out: str):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from megaqwen.kernels.attention import AttentionMeta
    from megaqwen.models.config import get_config
    from megaqwen.models.spec import get_spec
    from megaqwen.parallel.context_parallel import apply_context_parallel, context_parallel_inputs

    cfg = get_config("debug", vocab_size=1024)
    spec = get_spec(cfg)
    model = spec.build(cfg, seed=0)
    batch = _batch(t, doc_len, cfg.vocab_size)
    count = int((batch["labels"] != -100).sum())
    group = dist.new_group(list(range(world)))
    if mode != "sdpa":
        apply_context_parallel(model, spec, group, mode)
    base = _status_gib("VmRSS")
    dist.barrier()
    start = time.perf_counter()
    if mode == "sdpa":  # the plain model, one process
        parts = model(batch["tokens"], batch["labels"], batch["position_ids"],
                      AttentionMeta(batch["document_ids"]) if doc_len else None)
    else:
        local, meta = context_parallel_inputs(batch, group, document_mask=bool(doc_len), tile=tile)
        parts = model(local["tokens"], local["labels"], local["position_ids"], meta)
    (parts.sum / count).backward()
    elapsed = time.perf_counter() - start
    loss = parts.sum.detach().clone()
    dist.all_reduce(loss)
    row = {"rank": rank, "base": base, "peak": _status_gib("VmHWM"), "time": elapsed,
           "loss": loss.item() / count}
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        torch.save(rows, out)
    dist.destroy_process_group()


def run(t: int, mode: str, world: int, doc_len: int, tile: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "rows.pt")
        mp.start_processes(_worker, args=(world, _port(), t, mode, doc_len, tile, out), nprocs=world,
                           start_method="spawn")
        rows = torch.load(out)
    return {"t": t, "mode": mode, "cp": world, "time": max(r["time"] for r in rows),
            "peak": max(r["peak"] for r in rows), "growth": max(r["peak"] - r["base"] for r in rows),
            "loss": rows[0]["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="8192,16384,32768,65536", help="sequence lengths T")
    ap.add_argument("--modes", default="ring", help="ring,alltoall")
    ap.add_argument("--cp", type=int, default=2)
    ap.add_argument("--doc-len", type=int, default=0, help="mean packed document length (0: one)")
    ap.add_argument("--tile", type=int, default=1024, help="ring tile edge")
    ap.add_argument("--baseline", action="store_true", help="also one process, plain model (SDPA)")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = []
    print(f"debug model (vocab 1024), batch 1, fp32, 1 thread per rank, gloo; "
          f"{'documents of ~' + str(args.doc_len) + ' tokens' if args.doc_len else 'one document (causal)'}",
          flush=True)
    for t in lengths:
        if args.baseline:
            rows.append(run(t, "sdpa", 1, args.doc_len, args.tile))
            print(f"  done T={t} sdpa: {rows[-1]['time']:.1f} s", flush=True)
        for mode in args.modes.split(","):
            rows.append(run(t, mode, args.cp, args.doc_len, args.tile))
            print(f"  done T={t} {mode}: {rows[-1]['time']:.1f} s", flush=True)
    print("\n| T | attention | ranks | fwd+bwd (s) | tokens/s | peak RSS/rank (GiB) | growth/rank (GiB) "
          "| growth vs 1-process SDPA | loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = {r["t"]: r for r in rows if r["mode"] == "sdpa"}
    for r in rows:
        ratio = f"{r['growth'] / base[r['t']]['growth']:.2f}x" if r["t"] in base else "-"
        print(f"| {r['t']} | {r['mode']} | {r['cp']} | {r['time']:.1f} | {r['t'] / r['time']:.0f} | "
              f"{r['peak']:.2f} | {r['growth']:.2f} | {ratio} | {r['loss']:.4f} |")


if __name__ == "__main__":
    main()
