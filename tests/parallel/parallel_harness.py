"""Multi-process CPU (gloo) harness: run layouts of the debug model and compare with one process.

Every rank first trains the unsharded model on the whole global batch (the single-process
reference in plain PyTorch, same seed), then the same steps under each layout as a run of the
trainer (its Config, builders and `train_step`: trainer_harness.py), and reports on rank 0 the
relative loss differences, the worst error of the gradients the optimizer gets at the first step
(shards gathered back to full tensors), and the global gradient norm before and after clipping.
Several layouts share one spawn to pay process start-up once.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import traceback
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import trainer_harness as trainer
from torch.distributed.tensor import DTensor
from trainer_harness import reference_adamw

from megaqwen.models.config import get_config
from megaqwen.models.spec import get_spec
from megaqwen.parallel.collectives import _all_gather
from megaqwen.parallel.config import ParallelConfig
from megaqwen.parallel.grad_norm import grad_norm
from megaqwen.parallel.shards import ShardMap
from megaqwen.train.config import Config, TrainConfig

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
    micro: int = 0
    """Rows per micro-batch; 0: GLOBAL_B / dp, one micro-batch per rank and step (no accumulation)."""

    @property
    def name(self) -> str:
        extra = ("-sp" if self.sp else "") + ("" if self.recompute == "none" else f"-rc{self.recompute}")
        extra += f"-mb{self.micro}" if self.micro else ""
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


def global_batches(cfg) -> list[dict[str, torch.Tensor]]:
    """`batches` as the trainer's micro-batch dicts, one (GLOBAL_B, T) batch per step (plain causal:
    the runs use neither the positions nor the document ids, see `layout_config`)."""
    tokens, labels = batches(cfg)
    pos = torch.arange(T).expand(GLOBAL_B, T).contiguous()
    return [{"tokens": tokens[s], "labels": labels[s], "position_ids": pos,
             "document_ids": torch.zeros_like(tokens[s])} for s in range(STEPS)]


def reference(cfg) -> dict[str, Any]:
    """One process, plain PyTorch: the whole global batch per step, the runs' AdamW settings, the
    global norm clipped to half the first step's (so clipping acts; the runs clip at the same)."""
    model = get_spec(cfg).build(cfg, seed=SEED)  # the config's architecture
    opt = reference_adamw(model, TrainConfig(lr=LR))
    tokens, labels = batches(cfg)
    losses, grads, clipped = [], {}, {}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    for s in range(STEPS):
        loss = model(tokens[s], labels[s]).mean()
        loss.backward()
        if s == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            norm = grad_norm(model.named_parameters(), None).item()
            torch_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), norm / 2)
        if s == 0:
            clipped = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "grads": grads, "clipped_grads": clipped, "grad_norm": norm,
            "torch_grad_norm": torch_norm, "weights": weights}


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


def layout_config(cfg, layout: Layout, grad_clip: float = 0.0) -> Config:
    """The run's Config for `layout`: micro-batches of `layout.micro` rows (default GLOBAL_B / dp)."""
    ds = layout.mode.startswith("ds")
    pcfg = ParallelConfig(tp=layout.tp, dp=layout.dp, sequence_parallel=layout.sp,
                          dp_mode="ddp" if ds else layout.mode, zero_stage=int(layout.mode[2:]) if ds else 1,
                          recompute=layout.recompute, compile=layout.compile)
    micro = layout.micro or GLOBAL_B // layout.dp
    return trainer.layout_config(cfg, pcfg, STEPS, GLOBAL_B, micro, T, LR, SEED, grad_clip=grad_clip,
                                 engine="deepspeed" if ds else "native")


def full_weights(run: trainer.Run) -> dict[str, torch.Tensor]:
    """Every parameter made whole from its TP / FSDP / ZeRO-3 pieces (collective)."""
    params = dict(run.plain.named_parameters())
    zero3 = run.cfg.train.engine == "deepspeed" and run.cfg.parallel.zero_stage == 3
    with contextlib.ExitStack() as stack:
        if zero3:
            import deepspeed

            stack.enter_context(deepspeed.zero.GatheredParameters(list(params.values())))
        return {n: gather_full(p.detach().clone(), n, run.shards) for n, p in params.items()}


def run_layout(cfg, layout: Layout, world: int, ref: dict[str, Any]) -> dict[str, Any]:
    """STEPS steps of `layout` through the trainer's builders and `train_step`, against `ref`."""
    clip = ref["grad_norm"] / 2
    run = trainer.build_run(layout_config(cfg, layout, grad_clip=clip))
    weights = full_weights(run)
    init_equal = set(weights) == set(ref["weights"]) and \
        all(torch.equal(w, ref["weights"][n]) for n, w in weights.items())
    ds = layout.mode.startswith("ds")
    # the global norm of the gradients the optimizer gets: clipped to `clip` (DeepSpeed clips later)
    norm = None if ds else lambda r: grad_norm(r.plain.named_parameters(), r.shards).item()
    seen = trainer.capture_grads(run, gather_full, norm)
    metrics = trainer.run_steps(run, global_batches(cfg))
    want = ref["grads"] if ds else ref["clipped_grads"]
    grad_err = {n: ((g - want[n]).abs().max() / want[n].abs().max().clamp(min=1e-12)).item()
                for n, g in seen["grads"].items()}
    losses = [m["loss"] for m in metrics]
    rel = [abs(a - r) / abs(r) for a, r in zip(losses, ref["losses"])]
    return {"losses": losses, "loss_rel": max(rel), "grad_err": max(grad_err.values()),
            "worst_grad": max(grad_err, key=grad_err.get),
            "grad_norm_rel": abs(metrics[0]["grad_norm"] / ref["grad_norm"] - 1),
            "clipped_norm_rel": 0.0 if ds else abs(seen["also"] / clip - 1), "init_equal": init_equal}


def parity_worker(rank: int, world: int, layouts: list[Layout], cfg_overrides: dict) -> dict:
    cfg = get_config("debug", **cfg_overrides)
    ref = reference(cfg)
    out = {"ref_losses": ref["losses"], "ref_grad_norm": ref["grad_norm"],
           "ref_torch_grad_norm": ref["torch_grad_norm"]}
    for layout in layouts:
        out[layout.name] = run_layout(cfg, layout, world, ref)
    return out
