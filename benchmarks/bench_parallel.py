"""Training throughput of the tensor-parallel plan: tokens/s per layout, peak memory, MFU.

Each (model, tp) runs in its own group of `tp` processes (dp = 1): forward + backward + AdamW on
random tokens, fp32 on CPU (gloo), bf16 autocast on GPU (nccl, one GPU per rank). The first
`--warmup` steps are not timed. CPU threads are split evenly so every layout uses the same cores.

    python benchmarks/bench_parallel.py --models debug qwen2.5-0.5b --tp 1 2            # CPU
    python benchmarks/bench_parallel.py --device cuda --models qwen2.5-0.5b --tp 1 2 --seq-len 2048 \
        --batch 8                                                                      # GPUs
Prints one markdown table row per layout (paste into benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megaqwen.models.config import get_config
from megaqwen.models.spec import get_spec
from megaqwen.parallel.dims import ParallelDims
from megaqwen.parallel.materialize import materialize
from megaqwen.parallel.metrics import device_peak_flops, local_peak_memory_gib, mfu
from megaqwen.parallel.shards import local_param_bytes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, model_name: str, out: str):
    cuda = args.device == "cuda"
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    try:
        cfg = get_config(model_name)
        mesh = ParallelDims(world_size=world, tp=world).build_mesh(device.type)
        spec = get_spec(cfg)
        model = spec.build(cfg, device="meta")
        shards = spec.parallelize_tp(model, mesh, sequence_parallel=args.sp and world > 1)
        materialize(model, shards, device, seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
        g = torch.Generator(device=device).manual_seed(0)
        tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), device=device, generator=g)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
        times = []
        for step in range(args.warmup + args.steps):
            if cuda:
                torch.cuda.synchronize()
            dist.barrier()
            t0 = time.perf_counter()
            with autocast:
                loss = model(tokens[:, :-1], tokens[:, 1:]).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
        dt = sorted(times)[len(times) // 2]  # median step
        tok_s = args.batch * args.seq_len / dt  # dp = 1: every TP rank works on the same tokens
        mem = torch.tensor([local_peak_memory_gib(device)], device=device)
        dist.all_reduce(mem, op=dist.ReduceOp.MAX)
        peak = device_peak_flops(device, args.peak_flops)
        util = mfu(cfg.flops_per_token(args.seq_len), tok_s, peak, world)
        if rank == 0:
            torch.save(dict(tok_s=tok_s, step_s=dt, mem=mem.item(), util=util,
                            param_mib=local_param_bytes(model) / 2**20), out)
    finally:
        dist.destroy_process_group()


def run(args: argparse.Namespace, model_name: str, tp: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.pt")
        mp.start_processes(_worker, args=(tp, _free_port(), args, model_name, out), nprocs=tp,
                           start_method="spawn")
        return torch.load(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["debug", "qwen2.5-0.5b"])
    p.add_argument("--tp", nargs="+", type=int, default=[1, 2])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--sp", action="store_true", help="sequence parallelism on for tp > 1")
    p.add_argument("--peak-flops", type=float, default=0.0, help="device peak FLOP/s for MFU (0: table)")
    args = p.parse_args()
    if args.device == "cuda" and max(args.tp) > torch.cuda.device_count():
        p.error(f"--tp {max(args.tp)} needs that many GPUs; {torch.cuda.device_count()} visible")
    dev = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"# {dev}, seq_len {args.seq_len}, batch {args.batch}, "
          f"{'bf16 autocast' if args.device == 'cuda' else 'fp32'}, SP {'on' if args.sp else 'off'}")
    print("| model | tp | tokens/s | step s | params/rank MiB | peak mem/rank GiB | MFU |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        for tp in args.tp:
            r = run(args, name, tp)
            util = f"{r['util']:.1%}" if r["util"] is not None else "n/a"
            print(f"| {name} | {tp} | {r['tok_s']:.0f} | {r['step_s']:.3f} | {r['param_mib']:.0f} | "
                  f"{r['mem']:.2f} | {util} |", flush=True)


if __name__ == "__main__":
    main()
