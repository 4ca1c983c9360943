"""Multi-process CPU (gloo) harness: run layouts of the debug model and compare with one process.

Every rank first trains the unsharded model on the whole global batch (the single-process
reference, same seed), then the same steps under each layout, and reports on rank 0 the relative
loss differences and the worst gradient error after the first backward (shards gathered back to
full tensors), and the global gradient norm before and after clipping. Several layouts share one
spawn to pay process start-up once.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from megaqwen.models.config import get_config
from megaqwen.models.spec import get_spec
from megaqwen.parallel.collectives import _all_gather
from megaqwen.parallel.config import ParallelConfig
from megaqwen.parallel.data_parallel import apply_fsdp, build_optimizer, unwrap, wrap_ddp
from megaqwen.parallel.dims import ParallelDims
from megaqwen.parallel.grad_norm import clip_grad_norm_, grad_norm
from megaqwen.parallel.materialize import init_filler, materialize
from megaqwen.parallel.shards import ShardMap

# debug model with a smaller vocabulary (divisible by 4) so 4 oversubscribed ranks stay ~1 s/layout
CFG = dict(vocab_size=1024)
STEPS, GLOBAL_B, T, LR = 3, 4, 16, 3e-3
SEED = 1234  # init seed: every layout draws the same full weights from it


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    dp: int = 1
    sp: bool = False
    mode: str = "ddp"
    """ddp | zero1 | fsdp | ds1 | ds2 | ds3 (DeepSpeed ZeRO stage)."""
    recompute: str = "none"
    """none | selective | full."""
    compile: bool = False
    """torch.compile every decoder layer."""

    @property
    def name(self) -> str:
        extra = ("-sp" if self.sp else "") + ("" if self.recompute == "none" else f"-rc{self.recompute}")
        return f"tp{self.tp}-dp{self.dp}-{self.mode}" + extra + ("-compile" if self.compile else "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, args: tuple, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        if rank == 0:
            torch.save(result, out)
    except Exception:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, *args: Any) -> Any:
    """Run fn(rank, world, *args) on `world` gloo ranks; returns rank 0's result."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.pt")
        mp.start_processes(_worker, args=(world, free_port(), fn, args, out), nprocs=world,
                           start_method="fork")
        return torch.load(out, weights_only=False)


def batches(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """(STEPS, GLOBAL_B, T) inputs and shifted labels, fixed by seed."""
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, cfg.vocab_size, (STEPS, GLOBAL_B, T + 1), generator=g)
    return ids[..., :-1], ids[..., 1:]


def reference(cfg) -> dict[str, Any]:
    model = get_spec(cfg).build(cfg, seed=SEED)  # the config's architecture
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    tokens, labels = batches(cfg)
    losses, grads = [], {}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    for s in range(STEPS):
        loss = model(tokens[s], labels[s]).mean()
        loss.backward()
        if s == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            norm = grad_norm(model.named_parameters(), None).item()
            torch_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "grads": grads, "grad_norm": norm, "torch_grad_norm": torch_norm,
            "weights": weights}


def gather_full(t: torch.Tensor, fqn: str, shards: ShardMap) -> torch.Tensor:
    """The full tensor of parameter `fqn` (or its gradient) from its dp (FSDP) and tp pieces."""
    if isinstance(t, DTensor):
        t = t.full_tensor()
    shard = shards.get(fqn)
    if shard is None:
        return t
    full = _all_gather(t.contiguous(), shards.mesh.tp_group, shard.dim)
    if shard.replicas > 1:  # replicated KV heads: keep one copy of each
        full = torch.cat(full.chunk(shards.mesh.dims.tp, dim=shard.dim)[::shard.replicas], dim=shard.dim)
    return full


def build_parallel(cfg, layout: Layout, world: int):
    """The production assembly: meta build -> plans -> materialise local pieces -> DDP/engine."""
    dims = ParallelDims(world_size=world, tp=layout.tp, dp=layout.dp)
    mesh = dims.build_mesh("cpu")
    spec = get_spec(cfg)
    model = spec.build(cfg, device="meta")
    shards = spec.parallelize_tp(model, mesh, sequence_parallel=layout.sp)
    pcfg = ParallelConfig(tp=layout.tp, sequence_parallel=layout.sp, recompute=layout.recompute,
                          compile=layout.compile)
    from megaqwen.parallel.activation import apply_compile, apply_recompute

    apply_recompute(spec.layers(model), pcfg.recompute, spec.selective_recompute)
    if layout.compile:
        apply_compile(spec.layers(model))
    if layout.mode == "fsdp":
        apply_fsdp(model, mesh, spec.layers(model))
    if layout.mode.startswith("ds"):
        import deepspeed

        from megaqwen.parallel.deepspeed_engine import (
            DeepSpeedConfig,
            build_deepspeed_engine,
            materialize_zero3,
        )

        ds_cfg = DeepSpeedConfig(stage=int(layout.mode[2:]))
        if ds_cfg.stage == 3:  # DeepSpeed's own partitioned construction, block by block
            materialize_zero3(model, spec.layers(model), mesh, ds_cfg, torch.device("cpu"),
                              init_filler(model, shards, SEED))
        else:
            materialize(model, shards, "cpu", seed=SEED)
        engine = build_deepspeed_engine(model, mesh, ds_cfg, micro_batch_size=GLOBAL_B // layout.dp,
                                        shards=shards, lr=LR, weight_decay=0.1)
        params = dict(engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values()), enabled=ds_cfg.stage == 3):
            weights = {n: gather_full(p.detach().clone(), n, shards) for n, p in params.items()}
        return mesh, engine, engine, engine.module, shards, weights
    materialize(model, shards, "cpu", seed=SEED)
    weights = {n: gather_full(p.detach(), n, shards) for n, p in model.named_parameters()}
    wrapped = model if layout.mode == "fsdp" else wrap_ddp(model, mesh)
    opt = build_optimizer(wrapped.parameters(), mesh, layout.mode, lr=LR, weight_decay=0.1)
    return mesh, wrapped, opt, unwrap(wrapped), shards, weights


def run_layout(cfg, layout: Layout, world: int, ref: dict[str, Any]) -> dict[str, Any]:
    mesh, model, opt, plain, shards, weights = build_parallel(cfg, layout, world)
    init_equal = all(torch.equal(w, ref["weights"][n]) for n, w in weights.items()) and \
        set(weights) == set(ref["weights"])
    tokens, labels = batches(cfg)
    b = GLOBAL_B // layout.dp
    sl = slice(mesh.dp_rank * b, (mesh.dp_rank + 1) * b)
    losses, grad_err, norm_rel, clipped_rel = [], {}, 0.0, 0.0
    ds = layout.mode.startswith("ds")
    for s in range(STEPS):
        loss = model(tokens[s, sl], labels[s, sl]).mean()
        model.backward(loss) if ds else loss.backward()
        if s == 0:
            for n, p in plain.named_parameters():
                if ds:
                    from megaqwen.parallel.deepspeed_engine import full_grad_deepspeed

                    g = gather_full(full_grad_deepspeed(p, model), n, shards)
                else:
                    g = gather_full(p.grad, n, shards)
                r = ref["grads"][n]
                grad_err[n] = ((g - r).abs().max() / r.abs().max().clamp(min=1e-12)).item()
            if not ds:
                norm_rel = abs(grad_norm(plain.named_parameters(), shards).item() / ref["grad_norm"] - 1)
                # clip to half the norm, measure again, then put the unclipped gradients back
                unclipped = [p.grad.clone() for p in plain.parameters()]
                clip_grad_norm_(plain.named_parameters(), ref["grad_norm"] / 2, shards)
                clipped = grad_norm(plain.named_parameters(), shards).item()
                clipped_rel = abs(clipped / (ref["grad_norm"] / 2) - 1)
                for p, g in zip(plain.parameters(), unclipped):
                    p.grad = g
        model.step() if ds else (opt.step(), opt.zero_grad())
        loss = loss.detach().clone()
        dist.all_reduce(loss, group=mesh.dp_group)
        losses.append(loss.item() / layout.dp)
    rel = [abs(a - r) / abs(r) for a, r in zip(losses, ref["losses"])]
    return {"losses": losses, "loss_rel": max(rel), "grad_err": max(grad_err.values()),
            "worst_grad": max(grad_err, key=grad_err.get), "grad_norm_rel": norm_rel,
            "clipped_norm_rel": clipped_rel, "init_equal": init_equal}


def parity_worker(rank: int, world: int, layouts: list[Layout], cfg_overrides: dict) -> dict:
    cfg = get_config("debug", **cfg_overrides)
    ref = reference(cfg)
    out = {"ref_losses": ref["losses"], "ref_grad_norm": ref["grad_norm"],
           "ref_torch_grad_norm": ref["torch_grad_norm"]}
    for layout in layouts:
        out[layout.name] = run_layout(cfg, layout, world, ref)
    return out
