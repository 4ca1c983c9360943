"""MoE training throughput: expert parallelism degree x expert computation backend.

Each (ep, backend) runs in its own group of `ep` processes with dp = ep (every rank holds E/ep
experts and 1/ep of the global batch; tokens cross ranks by all-to-all): forward + backward +
expert-grad reduction + AdamW on random tokens. fp32 on CPU (gloo), bf16 autocast on GPU (nccl, one
GPU per rank). The global batch is fixed, so tokens/s compare directly; CPU threads are split evenly
so every layout uses the same cores. Baseline of the ratio column: ep=1 with the loop backend.

    python benchmarks/bench_moe.py                                               # CPU, debug-moe
    python benchmarks/bench_moe.py --device cuda --ep 1 --backends loop grouped_mm --seq-len 4096 \
        --batch 8 --set hidden_size=2048 moe_intermediate_size=1408 num_experts=60 \
        num_experts_per_tok=4 shared_expert_intermediate_size=5632 num_heads=16 num_kv_heads=16 \
        num_layers=4 decoder_sparse_step=1 mlp_only_layers=[]                 # one GPU, A2.7B layer shape
    python benchmarks/bench_moe.py --kernel-only                                 # expert GEMMs alone
`--kernel-only` times forward + backward of the expert computation by itself (kernels/moe.py) in
one process at a realistic expert shape (Qwen1.5-MoE-A2.7B: H 2048, I 1408, 60 experts, top-4), so
the backends compare without the model's and all-to-all's overheads.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import ast
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
from megaqwen.parallel.expert_parallel import (
    apply_expert_parallel,
    ddp_ignore_experts,
    ep_groups,
    reduce_expert_grads,
)
from megaqwen.parallel.materialize import materialize
from megaqwen.parallel.metrics import local_peak_memory_gib
from megaqwen.parallel.shards import ShardMap, local_param_bytes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        k, v = item.split("=", 1)
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, backend: str, out: str):
    cuda = args.device == "cuda"
    torch.set_num_threads(max(1, (args.threads or os.cpu_count() or 1) // world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    try:
        cfg = get_config(args.model, **_overrides(args.set))
        mesh = ParallelDims(world_size=world, ep=world).build_mesh(device.type)
        spec = get_spec(cfg)
        model = spec.build(cfg, device="meta")
        groups = ep_groups(mesh, world)
        fqns = apply_expert_parallel(model, groups)
        for block in model.moe_blocks().values():
            block.expert_backend = backend
        materialize(model, ShardMap(mesh), device, seed=0)
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ddp_ignore_experts(model, fqns)
            wrapped = DDP(model, process_group=mesh.dp_group, device_ids=[rank] if cuda else None)
        else:
            wrapped = model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
        b = args.batch // world
        g = torch.Generator(device=device).manual_seed(rank)
        tokens = torch.randint(0, cfg.vocab_size, (b, args.seq_len + 1), device=device, generator=g)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
        times = []
        for step in range(args.warmup + args.steps):
            if cuda:
                torch.cuda.synchronize()
            dist.barrier()
            t0 = time.perf_counter()
            with autocast:
                loss = wrapped(tokens[:, :-1], tokens[:, 1:]).mean()
            loss.backward()
            if world > 1:
                reduce_expert_grads(model, fqns, groups)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            dt = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            if step >= args.warmup:
                times.append(dt.item())
        step_s = sorted(times)[len(times) // 2]  # median step
        mem = torch.tensor([local_peak_memory_gib(device)], device=device)
        dist.all_reduce(mem, op=dist.ReduceOp.MAX)
        if rank == 0:
            torch.save(dict(tok_s=args.batch * args.seq_len / step_s, step_s=step_s, mem=mem.item(),
                            param_mib=local_param_bytes(model) / 2**20,
                            total=cfg.num_params(), active=cfg.active_params()), out)
    finally:
        dist.destroy_process_group()


def run(args: argparse.Namespace, ep: int, backend: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.pt")
        mp.start_processes(_worker, args=(ep, _free_port(), args, backend, out), nprocs=ep,
                           start_method="spawn")
        return torch.load(out)


def kernel_only(args: argparse.Namespace) -> None:
    from megaqwen.kernels.moe import IMPLS

    cuda = args.device == "cuda"
    device, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    if args.threads:
        torch.set_num_threads(args.threads)
    h, i, e, k = args.kernel_shape
    g = torch.Generator().manual_seed(0)
    a = args.tokens * k
    counts = torch.bincount(torch.randint(0, e, (a,), generator=g), minlength=e).tolist()  # random routing
    x = torch.randn(a, h, generator=g).to(device, dtype).requires_grad_()
    ws = [[(torch.randn(*shape, generator=g) * 0.02).to(device, dtype).requires_grad_() for _ in range(e)]
          for shape in ((i, h), (i, h), (h, i))]
    print(f"# {torch.cuda.get_device_name(0) if cuda else f'CPU ({torch.get_num_threads()} threads)'}, "
          f"H {h}, I {i}, {e} experts, top-{k}, {args.tokens} tokens, {dtype}; fwd+bwd of the experts")
    print("| backend | ms | vs loop | TFLOP/s |")
    print("|---|---|---|---|")
    flops = 3 * 6 * a * h * i  # 3 GEMMs, fwd + bwd (2 + 4 flops per MAC)
    base = None
    for name in args.backends:
        fn = IMPLS[name]
        times = []
        try:
            for step in range(args.warmup + args.steps):
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn(x, counts, *ws).float().square().mean().backward()
                if cuda:
                    torch.cuda.synchronize()
                if step >= args.warmup:
                    times.append(time.perf_counter() - t0)
        except RuntimeError as err:
            print(f"| {name} | failed: {str(err).splitlines()[0][:80]} | | |")
            continue
        dt = sorted(times)[len(times) // 2]
        base = base or (dt if name == "loop" else None)
        ratio = f"{base / dt:.2f}x" if base else "n/a"
        print(f"| {name} | {dt * 1e3:.1f} | {ratio} | {flops / dt / 1e12:.3f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="debug-moe")
    p.add_argument("--set", nargs="*", default=["vocab_size=4096"], metavar="KEY=VALUE",
                   help="model config overrides (default: vocab_size=4096, so the head does not dominate)")
    p.add_argument("--ep", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--backends", nargs="+", default=["loop", "bmm", "grouped_mm"])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="global batch (split over the ep ranks)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="CPU threads shared by all ranks (0: all cores)")
    p.add_argument("--kernel-only", action="store_true", help="time the expert computation alone")
    p.add_argument("--kernel-shape", nargs=4, type=int, default=[2048, 1408, 60, 4],
                   metavar=("H", "I", "E", "K"))
    p.add_argument("--tokens", type=int, default=2048, help="--kernel-only: tokens routed (x top-k rows)")
    args = p.parse_args()
    if args.kernel_only:
        return kernel_only(args)
    if args.device == "cuda" and max(args.ep) > torch.cuda.device_count():
        p.error(f"--ep {max(args.ep)} needs that many GPUs; {torch.cuda.device_count()} visible")
    dev = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"# {dev}, {args.model} {' '.join(args.set)}, seq_len {args.seq_len}, global batch "
          f"{args.batch}, {'bf16 autocast' if args.device == 'cuda' else 'fp32'}")
    print("| ep | experts backend | tokens/s | vs ep1 loop | step s | params/rank MiB | peak mem/rank GiB |")
    print("|---|---|---|---|---|---|---|")
    base = None
    for ep in args.ep:
        for backend in args.backends:
            r = run(args, ep, backend)
            if base is None and ep == 1 and backend == "loop":
                base = r["tok_s"]
            ratio = f"{r['tok_s'] / base:.2f}x" if base else "n/a"
            print(f"| {ep} | {backend} | {r['tok_s']:.0f} | {ratio} | {r['step_s']:.3f} | "
                  f"{r['param_mib']:.1f} | {r['mem']:.2f} |", flush=True)
    print(f"\n# total params {r['total'] / 1e6:.2f}M, active {r['active'] / 1e6:.2f}M")


if __name__ == "__main__":
    main()
