"""MoE training throughput by layout (ep x tp, expert TP), against transformers' Qwen2-MoE.

Layouts (default): each (ep, tp) of `--ep` x `--tp` runs the trainer's own step (`train_step`: DDP,
expert-grad reduction, grad norm, AdamW) on ep*tp processes, dp = ep, tp as `parallel.tp` with
`parallel.etp` (`--etp`, values tried at tp > 1; default -1 = tp: experts' intermediate dim split
over the tp group; 1: sequence-parallel dispatch; 0: the old layout, experts whole on every tp
rank). The global batch is fixed, so tokens/s compare directly; CPU threads are split evenly over
the ranks. Per layout: tokens/s, per-rank peak memory (CPU: the process's peak RSS, ~0.3 GiB of it
torch itself), parameters per rank, all-to-all bytes per rank and step (the dispatcher's counter,
forward x 2 for backward), routed-expert GFLOP per rank and step (the blocks' counter, forward x 3;
the max over ranks), and the planner's arithmetic for the same layout
(`megaqwen.parallel.expert_tensor_parallel.expert_layout_cost`, balanced routing).
`--hf` adds one process of transformers' Qwen2MoeForCausalLM (same config, aux loss on, sdpa) and
our model in one process (ep1 tp1), each in a fresh process (1 thread on CPU): step time, its CPU
time, peak memory. On a shared VM compare CPU s/step (the process's own CPU time, which other jobs
do not inflate much); wall time swings 10x with the load.

    python benchmarks/bench_moe.py                                   # CPU: debug-moe, then 64 experts top-8
    python benchmarks/bench_moe.py --configs e64 --no-layouts --hf   # ours vs transformers only
    # GPU (one node, N GPUs, nccl, bf16 autocast; ep*tp <= N):
    python benchmarks/bench_moe.py --device cuda --configs e64 a2.7b --ep 1 2 4 --tp 1 2 \
        --seq-len 4096 --batch 16 --hf
`--kernel-only` times forward + backward of the expert computation by itself (kernels/moe.py) in
one process at a realistic expert shape (Qwen1.5-MoE-A2.7B: H 2048, I 1408, 60 experts, top-4).
Prints markdown tables.
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
from megaqwen.parallel.metrics import local_peak_memory_gib
from megaqwen.parallel.shards import local_param_bytes


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


CONFIGS = {
    "debug-moe": ("debug-moe", dict(vocab_size=4096)),
    # 64 routed experts, top-8, every layer sparse: the routing shape of Qwen3-30B-A3B / OLMoE, small
    "e64": ("debug-moe", dict(vocab_size=4096, hidden_size=128, num_heads=4, num_kv_heads=2,
                              num_experts=64, num_experts_per_tok=8, moe_intermediate_size=64,
                              shared_expert_intermediate_size=128, decoder_sparse_step=1,
                              mlp_only_layers=[])),
    # Qwen1.5-MoE-A2.7B's layer shape, 4 layers (GPU)
    "a2.7b": ("debug-moe", dict(vocab_size=151936, hidden_size=2048, num_heads=16, num_kv_heads=16,
                                num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                                shared_expert_intermediate_size=5632, num_layers=4, decoder_sparse_step=1,
                                mlp_only_layers=[])),
}


def model_config(name: str, extra: list[str]):
    base, kw = CONFIGS.get(name, (name, {}))
    return get_config(base, **{**kw, **_overrides(extra)})


def _run_config(model_cfg, args: argparse.Namespace, ep: int, tp: int, etp: int, backend: str):
    from megaqwen.parallel.config import ParallelConfig
    from megaqwen.train.config import Config, DataConfig, LoggerConfig, TrainConfig, WandbConfig

    cuda = args.device == "cuda"
    pcfg = ParallelConfig(tp=tp, ep=ep, etp=etp, dp=ep, backend="nccl" if cuda else "gloo")
    train = TrainConfig(steps=args.warmup + args.steps, seq_len=args.seq_len, global_batch_size=args.batch,
                        micro_batch_size=args.batch // ep, lr=1e-4, min_lr=0.0, schedule="constant",
                        warmup_steps=0, grad_clip=1.0, dtype="bf16" if cuda else "fp32",
                        device=args.device, seed=0, save_every=0, fit_check=False)
    cfg = Config(model=model_cfg, parallel=pcfg, train=train,
                 data=DataConfig(reset_position_ids=False, document_mask=False),
                 logger=LoggerConfig(wandb=WandbConfig(enabled=False, mode="disabled")))
    cfg.validate()
    return cfg


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, layout: tuple, out: str):
    """One rank of one layout: the trainer's model, optimizer and `train_step` on random tokens."""
    import megaqwen.parallel.setup as par
    from megaqwen.train.assemble import build_training, seed_and_ops
    from megaqwen.train.loop import train_step

    name, ep, tp, etp, backend = layout
    cuda = args.device == "cuda"
    torch.set_num_threads(max(1, (args.threads or os.cpu_count() or 1) // world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    model_cfg = model_config(name, args.set)
    cfg = _run_config(model_cfg, args, ep, tp, etp, backend)
    if world == 1:  # the trainer runs one process without a process group; the timing uses one
        dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    env = par.init_distributed(cfg.parallel, args.device)
    try:
        accum = par.accumulation_steps(args.batch, args.batch // ep, env.dp_size)
        plan = par.check_layout(cfg.parallel, env, model_cfg, args.seq_len)
        built = build_training(cfg, env, seed_and_ops(cfg, env), plan, accum, resuming=False)
        plain = built.model.module if hasattr(built.model, "module") else built.model
        blocks = plain.moe_blocks().values()
        for block in blocks:
            block.expert_backend = backend
        g = torch.Generator().manual_seed(env.dp_rank)  # tp ranks of one dp rank: the same rows
        b = args.batch // ep
        ids = torch.randint(0, model_cfg.vocab_size, (b, args.seq_len + 1), generator=g).to(env.device)
        batch = {"tokens": ids[:, :-1], "labels": ids[:, 1:]}
        times, cpus = [], []
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                for block in blocks:
                    block.expert_flops = 0
                    if block.dispatcher is not None and hasattr(block.dispatcher, "a2a_bytes"):
                        block.dispatcher.a2a_bytes = 0
            if cuda:
                torch.cuda.synchronize()
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            train_step(built.model, built.optimizer, iter([batch]), cfg, env, step, accum, built.shards,
                       built.pipe)
            if cuda:
                torch.cuda.synchronize()
            dt = torch.tensor([time.perf_counter() - t0, time.process_time() - c0], device=env.device)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            if step >= args.warmup:
                times.append(dt[0].item())
                cpus.append(dt[1].item())
        step_s = sorted(times)[len(times) // 2]  # median step
        cpu_s = sorted(cpus)[len(cpus) // 2]  # its CPU time on the busiest rank (robust to a shared VM)
        flops = sum(bl.expert_flops for bl in blocks) * 3 / args.steps  # forward counted: x3 fwd+bwd
        a2a = sum(getattr(bl.dispatcher, "a2a_bytes", 0) for bl in blocks) * 2 / args.steps  # + backward
        mine = torch.tensor([local_peak_memory_gib(env.device), local_param_bytes(plain) / 2**20, flops, a2a],
                            dtype=torch.float64, device=env.device)
        dist.all_reduce(mine, op=dist.ReduceOp.MAX)
        if rank == 0:
            torch.save(dict(tok_s=args.batch * args.seq_len / step_s, step_s=step_s, cpu_s=cpu_s,
                            mem=mine[0].item(),
                            param_mib=mine[1].item(), tflop=mine[2].item() / 1e12,
                            a2a_mib=mine[3].item() / 2**20,
                            total=model_cfg.num_params(), active=model_cfg.active_params()), out)
    finally:
        dist.destroy_process_group()


def run(args: argparse.Namespace, layout: tuple) -> dict:
    _, ep, tp, _, _ = layout
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.pt")
        # fork on CPU: the ranks inherit the imports (spawn re-imports torch per rank: minutes on a
        # loaded 2-core VM); CUDA needs spawn
        mp.start_processes(_worker, args=(ep * tp, _free_port(), args, layout, out), nprocs=ep * tp,
                           start_method="spawn" if args.device == "cuda" else "fork")
        return torch.load(out)


def _build(kind: str, cfg, device: torch.device):
    torch.manual_seed(0)
    if kind == "hf":
        from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

        from megaqwen.models.qwen2_moe.hf_adapter import config_to_hf

        hf_cfg = Qwen2MoeConfig(**{**config_to_hf(cfg, torch.float32), "output_router_logits": True})
        return Qwen2MoeForCausalLM._from_config(hf_cfg, attn_implementation="sdpa").to(device)
    return get_spec(cfg).build(cfg, device=device, seed=0)


def _stepper(kind: str, model, cfg, ids: torch.Tensor, cuda: bool):
    """One training step (fwd, bwd, AdamW) of `model` on `ids`, as a closure."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def step():
        with autocast:
            if kind == "hf":
                loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss  # CE + coef * aux
            else:
                parts = model(ids[:, :-1], ids[:, 1:])
                loss = parts.mean() + cfg.router_aux_loss_coef * parts.aux
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _one_process(kinds: tuple[str, ...], args: argparse.Namespace, name: str, out: str) -> None:
    """Train `kinds` in this process, their steps interleaved (both see the same load): median step
    and CPU time per step of each, and the process's peak memory (meaningful with one kind)."""
    cuda = args.device == "cuda"
    device = torch.device(args.device)
    torch.set_num_threads(args.threads or (os.cpu_count() if cuda else 1))  # CPU: 1 thread, no stalls
    cfg = model_config(name, args.set)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), generator=g).to(device)
    steps = {k: _stepper(k, _build(k, cfg, device), cfg, ids, cuda) for k in kinds}
    times = {k: ([], []) for k in kinds}
    for step in range(args.warmup + args.steps):
        for k, fn in steps.items():
            if cuda:
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            if cuda:
                torch.cuda.synchronize()
            if step >= args.warmup:
                times[k][0].append(time.perf_counter() - t0)
                times[k][1].append(time.process_time() - c0)
    res = {}
    for k, (wall, cpu) in times.items():
        step_s, cpu_s = sorted(wall)[len(wall) // 2], sorted(cpu)[len(cpu) // 2]
        res[k] = dict(step_s=step_s, cpu_s=cpu_s, tok_s=args.batch * args.seq_len / step_s)
    res["mem"] = local_peak_memory_gib(device)
    torch.save(res, out)


def _in_fresh_process(kinds: tuple[str, ...], args: argparse.Namespace, name: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.pt")
        p = mp.get_context("spawn").Process(target=_one_process, args=(kinds, args, name, out))
        p.start()
        p.join()
        if p.exitcode:
            raise RuntimeError(f"{kinds} run failed (exit {p.exitcode})")
        return torch.load(out)


def against_hf(args: argparse.Namespace, name: str) -> None:
    """Timing: both models in one process, steps interleaved; peak memory: each alone in a fresh one."""
    both = _in_fresh_process(("megaqwen", "hf"), args, name)
    rows = {k: {**both[k], "mem": _in_fresh_process((k,), args, name)["mem"]} for k in ("megaqwen", "hf")}
    ours, hf = rows["megaqwen"], rows["hf"]
    print(f"\n# {name}: one process, ours vs transformers Qwen2MoeForCausalLM (same config, aux loss on; "
          "steps interleaved in one process, peak memory of each alone)")
    print("| model | tokens/s | step s | CPU s/step | peak mem GiB |")
    print("|---|---|---|---|---|")
    for kind, r in rows.items():
        print(f"| {kind} | {r['tok_s']:.0f} | {r['step_s']:.3f} | {r['cpu_s']:.3f} | {r['mem']:.2f} |")
    print(f"ours / transformers: {ours['tok_s'] / hf['tok_s']:.2f}x the speed (wall), "
          f"{hf['cpu_s'] / ours['cpu_s']:.2f}x (CPU time), at {ours['mem'] / hf['mem']:.2f}x the peak memory",
          flush=True)


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


def _preload() -> None:
    """Import what the ranks run before forking them."""
    import megaqwen.parallel.setup  # noqa: F401
    import megaqwen.train.assemble  # noqa: F401
    import megaqwen.train.loop  # noqa: F401


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["debug-moe", "e64"], help=f"from {sorted(CONFIGS)} "
                   "or a model name")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="model config overrides")
    p.add_argument("--ep", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--tp", nargs="+", type=int, default=[1, 2])
    p.add_argument("--etp", nargs="+", type=int, default=[-1],
                   help="parallel.etp values tried at tp > 1 (-1 = tp; 0 = experts whole per tp rank)")
    p.add_argument("--backends", nargs="+", default=["auto"], help="expert backends (kernels/moe.py)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="global batch (split over the dp = ep ranks)")
    p.add_argument("--steps", type=int, default=4, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="CPU threads shared by all ranks (0: all cores)")
    p.add_argument("--hf", action="store_true", help="also one process of ours vs transformers' Qwen2-MoE")
    p.add_argument("--no-layouts", action="store_true", help="skip the ep x tp grid (with --hf)")
    p.add_argument("--kernel-only", action="store_true", help="time the expert computation alone")
    p.add_argument("--kernel-shape", nargs=4, type=int, default=[2048, 1408, 60, 4],
                   metavar=("H", "I", "E", "K"))
    p.add_argument("--tokens", type=int, default=2048, help="--kernel-only: tokens routed (x top-k rows)")
    args = p.parse_args()
    if args.kernel_only:
        return kernel_only(args)
    if args.device == "cuda" and max(args.ep) * max(args.tp) > torch.cuda.device_count():
        p.error(f"--ep x --tp {max(args.ep) * max(args.tp)} needs that many GPUs; "
                f"{torch.cuda.device_count()} visible")
    from megaqwen.parallel.expert_tensor_parallel import expert_layout_cost

    _preload()

    dev = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    for name in args.configs:
        cfg = model_config(name, args.set)
        print(f"\n# {dev}, {name}: H {cfg.hidden_size}, {cfg.num_experts} experts "
              f"top-{cfg.num_experts_per_tok}, I {cfg.moe_intermediate_size}, {cfg.num_layers} layers, "
              f"{cfg.num_params() / 1e6:.2f}M params ({cfg.active_params() / 1e6:.2f}M active); "
              f"seq_len {args.seq_len}, global batch {args.batch}, "
              f"{'bf16 autocast' if args.device == 'cuda' else 'fp32'}")
        if not args.no_layouts:
            print("| ep | tp | etp | backend | tokens/s | vs ep1 tp1 | step s | CPU s/step | params/rank MiB "
                  "| peak mem/rank GiB | a2a MiB/rank/step | expert GFLOP/rank/step | planner GFLOP "
                  "| planner a2a MiB |")
            print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
            base = None
            sparse = sum(cfg.is_sparse_layer(i) for i in range(cfg.num_layers))
            for tp, etp in [(t, e) for t in args.tp for e in (args.etp if t > 1 else [-1])]:
                for ep in args.ep:
                    for backend in args.backends:
                        r = run(args, (name, ep, tp, etp, backend))
                        base = base or (r["tok_s"] if ep == tp == 1 else None)
                        ratio = f"{r['tok_s'] / base:.2f}x" if base else "n/a"
                        c = expert_layout_cost(args.batch // ep * args.seq_len, cfg.hidden_size,
                                               cfg.moe_intermediate_size, cfg.num_experts,
                                               cfg.num_experts_per_tok, sparse, tp, ep, etp,
                                               act_bytes=2 if args.device == "cuda" else 4)
                        print(f"| {ep} | {tp} | {etp if tp > 1 else '-'} | {backend} | {r['tok_s']:.0f} | "
                              f"{ratio} | {r['step_s']:.3f} | {r['cpu_s']:.3f} | "
                              f"{r['param_mib']:.2f} | {r['mem']:.2f} | {r['a2a_mib']:.2f} | "
                              f"{r['tflop'] * 1e3:.2f} | "
                              f"{c.expert_flops / 1e9:.2f} | {c.a2a_bytes / 2**20:.2f} |", flush=True)
        if args.hf:
            against_hf(args, name)


if __name__ == "__main__":
    main()
