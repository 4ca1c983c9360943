"""Per-rank memory of model assembly: sharded HF loading under TP, and DeepSpeed ZeRO-3 training.

    python benchmarks/bench_memory.py init   # init_from an HF folder of the 0.5B config under tp=2
    python benchmarks/bench_memory.py zero3  # 2 training steps: one process vs ZeRO-3 at dp=2

`init` writes a random-weight HF folder (bf16 safetensors, like the official checkpoint), then in
fresh 2-rank groups (tp=2, gloo) assembles the model two ways and reports each rank's peak RSS
above its RSS after imports:
  sharded  meta build -> TP plan -> allocate local pieces -> read only those slices (what the
           trainer does now)
  full     the old path: every rank builds the whole fp32 model, reads the whole state dict,
           then the TP plan slices it
`zero3` trains the 0.5B config for 2 steps on random tokens (fp32, AdamW) in one process, then
with the DeepSpeed engine at ZeRO-3 over 2 ranks, and reports peak RSS per rank.
Every variant runs in fresh processes, since peak RSS only grows within one.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MODEL = "qwen2.5-0.5b"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def _peak_gib() -> float:
    """This process's peak RSS (VmHWM). Not getrusage's ru_maxrss: Linux carries that over fork and
    exec, so a worker would report its parent's peak (here: the process that wrote the HF folder)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmHWM in /proc/self/status")


def _init_worker(rank, world, port, mode, hf_dir, out):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from megaqwen.models.config import get_config
    from megaqwen.models.spec import get_spec
    from megaqwen.parallel.dims import ParallelDims
    from megaqwen.parallel.materialize import hf_filler, materialize
    from megaqwen.parallel.shards import local_param_bytes

    cfg = get_config(MODEL)
    spec = get_spec(cfg)
    mesh = ParallelDims(world_size=world, tp=world).build_mesh("cpu")
    base = _rss_gib()
    if mode == "sharded":
        model = spec.build(cfg, device="meta")
        shards = spec.parallelize_tp(model, mesh)
        materialize(model, shards, "cpu", filler=hf_filler(model, shards, hf_dir, spec.hf.hf_key,
                                                          spec.hf.optional_hf_keys(cfg)))
    else:
        from safetensors.torch import load_file

        model = spec.build(cfg, device="cpu", seed=0)
        model.load_state_dict(load_file(Path(hf_dir) / "model.safetensors"), strict=True)
        spec.parallelize_tp(model, mesh)
    import gc

    gc.collect()
    row = {"rank": rank, "base": base, "peak": _peak_gib(), "end": _rss_gib(),
           "local_gib": local_param_bytes(model) / 2**30}
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        torch.save(rows, out)
    dist.destroy_process_group()


def _spawn(fn, world, *args):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "rows.pt")
        mp.start_processes(fn, args=(world, _port(), *args, out), nprocs=world, start_method="spawn")
        return torch.load(out)


def bench_init() -> None:
    from safetensors.torch import save_file

    from megaqwen.models.config import get_config
    from megaqwen.models.spec import get_spec

    cfg = get_config(MODEL)
    full_gib = 4 * cfg.num_params() / 2**30
    with tempfile.TemporaryDirectory() as d:
        model = get_spec(cfg).build(cfg, device="cpu", seed=0)
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()},
                  os.path.join(d, "model.safetensors"))
        del model
        print(f"{MODEL}: {cfg.num_params() / 1e6:.0f}M parameters, {full_gib:.2f} GiB in fp32; "
              f"HF folder {os.path.getsize(os.path.join(d, 'model.safetensors')) / 2**30:.2f} GiB (bf16)\n")
        print("| path | rank | local fp32 params (GiB) | RSS after imports (GiB) | peak RSS (GiB) | "
              "peak above imports (GiB) | vs full fp32 model |")
        print("|---|---|---|---|---|---|---|")
        for mode in ("sharded", "full"):
            for r in _spawn(_init_worker, 2, mode, d):
                extra = r["peak"] - r["base"]
                print(f"| {mode} | {r['rank']} | {r['local_gib']:.2f} | {r['base']:.2f} | {r['peak']:.2f} | "
                      f"{extra:.2f} | {extra / full_gib:.2f}x |", flush=True)


def _train_worker(rank, world, port, engine, bucket, out):
    torch.set_num_threads(1 if world > 1 else 2)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    from megaqwen.models.config import get_config
    from megaqwen.models.spec import get_spec
    from megaqwen.parallel.materialize import init_filler, materialize

    cfg = get_config(MODEL)
    spec = get_spec(cfg)
    model = spec.build(cfg, device="meta")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, 129), generator=g)
    losses = []
    if engine == "single":
        from megaqwen.parallel.shards import ShardMap

        materialize(model, ShardMap(), "cpu", seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for _ in range(2):
            loss = model(ids[:, :-1], labels=ids[:, 1:]).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        torch.save([{"rank": 0, "peak": _peak_gib(), "losses": losses}], out)
        return
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from megaqwen.parallel.deepspeed_engine import DeepSpeedConfig, build_deepspeed_engine, materialize_zero3
    from megaqwen.parallel.dims import ParallelDims

    mesh = ParallelDims(world_size=world).build_mesh("cpu")
    shards = spec.parallelize_tp(model, mesh)
    ds_cfg = DeepSpeedConfig(stage=3, **({"bucket_elements": bucket} if bucket else {}))
    materialize_zero3(model, spec.layers(model), mesh, ds_cfg, torch.device("cpu"),
                      init_filler(model, shards, 0))
    phases = {"built": _rss_gib()}
    engine = build_deepspeed_engine(model, mesh, ds_cfg, micro_batch_size=1, shards=shards, lr=1e-4)
    phases["engine"] = _rss_gib()
    for i in range(2):
        loss = engine(ids[:, :-1], labels=ids[:, 1:]).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        phases[f"step{i + 1}"] = _rss_gib()
    print(f"rank {rank} RSS by phase (GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()),
          file=sys.stderr, flush=True)
    rows = [None] * world
    dist.all_gather_object(rows, {"rank": rank, "peak": _peak_gib(), "losses": losses})
    if rank == 0:
        torch.save(rows, out)
    dist.destroy_process_group()


RUNS = {"single": 1, "deepspeed-zero3": 2}


def bench_zero3(only: str | None = None, bucket: int | None = None) -> None:
    print(f"{MODEL}: 2 training steps of 1 x 128 random tokens, fp32, AdamW (CPU)\n")
    print("| engine | ranks | rank | peak RSS (GiB) | losses |")
    print("|---|---|---|---|---|")
    for engine, world in RUNS.items():
        if only and engine != only:
            continue
        for r in _spawn(_train_worker, world, engine, bucket):
            print(f"| {engine} | {world} | {r['rank']} | {r['peak']:.2f} | "
                  f"{', '.join(f'{x:.4f}' for x in r['losses'])} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["init", "zero3"], help="which measurement to run")
    ap.add_argument("--only", choices=list(RUNS), help="zero3: run just this engine")
    ap.add_argument("--bucket", type=int, help="zero3: DeepSpeedConfig.bucket_elements (default: ours)")
    args = ap.parse_args()
    bench_init() if args.what == "init" else bench_zero3(args.only, args.bucket)


if __name__ == "__main__":
    sys.exit(main())
