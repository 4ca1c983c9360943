"""No repeated expert work under tp (issue 24): expert tensor parallelism and sequence-parallel
dispatch on 4 gloo ranks (tp2 x dp2) against one process, debug-moe, dropless, fp32.

Layouts (parallel.etp): etp2 = each expert's intermediate dim over the tp pair, ep2 over dp;
etp1 = the tp pair's rows cut in two parts, ep4 folded over tp x dp (experts whole); etp0 = the old
layout (experts whole on both tp ranks, every rank computing all its tp group's rows), kept to show
what the others remove. Each rank reports the expert FLOPs its blocks counted in the first step's
forward, its expert parameter bytes, and the losses / gradients as tests/parallel/test_expert_parallel.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megaqwen.kernels.moe import expert_flops
from megaqwen.parallel.config import ParallelConfig
from megaqwen.parallel.expert_tensor_parallel import expert_layout_cost
from tests.parallel.parallel_harness import gather_full, spawn
from tests.parallel.test_expert_parallel import (
    GLOBAL_B,
    LR,
    SEED,
    STEPS,
    T,
    _cfg,
    _global_batches,
    _reference,
)
from tests.parallel.trainer_harness import build_run, capture_grads, layout_config, run_steps

WORLD, TP = 4, 2


def _stats(run) -> dict:
    blocks = run.plain.moe_blocks()
    return dict(flops=sum(b.expert_flops for b in blocks.values()),
                a2a=sum(getattr(b.dispatcher, "a2a_bytes", 0) for b in blocks.values()))


def _checkpoint_into_one_process(cfg, run, path: str) -> float:
    """The trainer's checkpoint of this layout loaded into an unsharded model on every rank: the
    largest difference to this rank's pieces (0: each expert slice saved where it sits)."""
    from megaqwen.models.spec import get_spec
    from megaqwen.parallel import checkpoint

    checkpoint.save(path, run.model, run.optimizer, run.shards)
    full = get_spec(cfg).build(cfg, seed=0)  # other values: everything must be overwritten
    checkpoint.load_model(path, full, None)
    whole = dict(full.named_parameters())
    err = 0.0
    for n, p in run.plain.named_parameters():
        box = tuple(slice(a, b) for a, b in run.shards.box(n, p))
        err = max(err, (whole[n][box] - p.detach()).abs().max().item())
    worst = torch.tensor([err])
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return worst.item()


def _layout(cfg, ref, ep: int, etp: int, ckpt: str | None = None) -> dict:
    pcfg = ParallelConfig(tp=TP, ep=ep, etp=etp)
    run = build_run(layout_config(cfg, pcfg, STEPS, GLOBAL_B, GLOBAL_B // (WORLD // TP), T, LR, SEED))
    fqns = run.shards.expert_fqns
    seen = capture_grads(run, gather_full, also=_stats)  # first step, after the expert reductions
    metrics = run_steps(run, _global_batches(cfg))
    err = {n: ((g - ref["grads"][n]).abs().max() / ref["grads"][n].abs().max().clamp(min=1e-12)).item()
           for n, g in seen["grads"].items()}
    worst = torch.tensor([max(err.values())])
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # expert grads are checked where they live
    params = run.plain.named_parameters()
    expert_bytes = sum(p.numel() * p.element_size() for n, p in params if n in fqns)
    # what one process's routing sends to this rank's experts, in the first step's forward
    mine = {n: [int(k.split(".")[-3]) for k in fqns if k.startswith(n + ".") and k.endswith("up_proj.weight")]
            for n in ref["load"]}
    rows_here = sum(int(ref["load"][n][mine[n]].sum()) for n in ref["load"])
    ckpt_err = _checkpoint_into_one_process(cfg, run, f"{ckpt}/etp{etp}") if ckpt else None
    got = [None] * WORLD
    dist.all_gather_object(got, dict(flops=seen["also"]["flops"], a2a=seen["also"]["a2a"],
                                     bytes=expert_bytes, rows_here=rows_here))
    return dict(loss_rel=max(abs(m["loss"] - r) / abs(r) for m, r in zip(metrics, ref["losses"])),
                grad_err=worst.item(), norm_rel=abs(metrics[0]["grad_norm"] / ref["norm"] - 1), ranks=got,
                ckpt_err=ckpt_err)


def _worker(rank: int, world: int, ckpt: str) -> dict:
    cfg = _cfg()
    ref = _reference(cfg)
    one = _one_process_expert_bytes(cfg)
    out = {f"etp{etp}": _layout(cfg, ref, ep, etp, ckpt if etp else None)
           for ep, etp in ((2, 2), (4, 1), (2, 0))}
    rows = int(sum(v.sum() for v in ref["load"].values()))  # assignments of the global batch
    out["one"] = dict(flops=expert_flops(rows, cfg.hidden_size, cfg.moe_intermediate_size), bytes=one,
                      layers=list(ref["load"]))
    return out


def _one_process_expert_bytes(cfg) -> int:
    from megaqwen.models.spec import get_spec

    model = get_spec(cfg).build(cfg, device="meta")
    return sum(p.numel() * 4 for n, p in model.named_parameters() if ".experts." in n)


@pytest.mark.distributed
@pytest.mark.slow
def test_ep2_x_tp2_splits_expert_work_and_weights_over_ep_times_tp(tmp_path):
    cfg = _cfg()
    out = spawn(_worker, WORLD, str(tmp_path))
    one = out.pop("one")
    h, i = cfg.hidden_size, cfg.moe_intermediate_size
    for name, r in out.items():
        assert r["loss_rel"] <= 1e-5 and r["grad_err"] <= 1e-5 and r["norm_rel"] <= 1e-5, (name, r)
    assert out["etp2"]["ckpt_err"] == 0 and out["etp1"]["ckpt_err"] == 0  # checkpoints hold every slice
    # expert TP (ep2 x etp2): each rank has 1/(ep*tp) of the expert weights and runs its experts'
    # rows of the whole batch at I/2: the ranks' FLOPs add up to one process's, not tp times it
    etp2 = out["etp2"]["ranks"]
    assert all(r["bytes"] * 4 == one["bytes"] for r in etp2), etp2
    assert all(r["flops"] == expert_flops(r["rows_here"], h, i // 2) for r in etp2), etp2
    assert sum(r["flops"] for r in etp2) == one["flops"]
    # sequence-parallel dispatch folded (ep4 x etp1): whole experts, 1/4 of them per rank; each tp
    # rank computes its half of the pair's rows (at most one padding row per part and layer)
    etp1 = out["etp1"]["ranks"]
    assert all(r["bytes"] * 4 == one["bytes"] for r in etp1), etp1
    assert one["flops"] <= sum(r["flops"] for r in etp1) <= one["flops"] + 2 * 2 * expert_flops(1, h, i)
    assert all(r["a2a"] > 0 for r in etp1)
    # the old layout: half the weights per rank and every tp rank repeats its pair's expert work
    etp0 = out["etp0"]["ranks"]
    assert all(r["bytes"] * 2 == one["bytes"] for r in etp0), etp0
    assert sum(r["flops"] for r in etp0) == TP * one["flops"]
    # the planner's arithmetic (balanced routing) matches the counters on average over the ranks
    rows = GLOBAL_B // (WORLD // TP) * T
    for name, ep, etp in (("etp2", 2, 2), ("etp1", 4, 1), ("etp0", 2, 0)):
        cost = expert_layout_cost(rows, h, i, cfg.num_experts, cfg.num_experts_per_tok, len(one["layers"]),
                                  TP, ep, etp, param_bytes=4)
        ranks = out[name]["ranks"]
        assert cost.expert_param_bytes == ranks[0]["bytes"], name
        assert cost.expert_flops / 3 == pytest.approx(sum(r["flops"] for r in ranks) / WORLD, rel=1e-3), name


def test_expert_layouts_that_do_not_fit_are_refused_before_work():
    from megaqwen.models.config import get_config
    from megaqwen.models.spec import get_spec
    from megaqwen.parallel.dims import ParallelDims

    ParallelDims(world_size=4, tp=2, ep=4, etp=1)  # sequence-parallel dispatch: ep folded over tp
    with pytest.raises(ValueError, match=r"ep=4 must divide dp\*cp=2\*1=2 "):
        ParallelDims(world_size=4, tp=2, ep=4)  # expert TP over tp: ep from the dp ranks only
    with pytest.raises(ValueError, match="parallel.etp=2 must be -1 or tp=4"):
        ParallelDims(world_size=4, tp=4, etp=2)
    cfg = get_config("debug-moe", moe_intermediate_size=50)
    with pytest.raises(ValueError, match="moe_intermediate_size=50 is not divisible by etp=4"):
        ParallelDims(world_size=4, tp=4).validate_model(cfg, get_spec(cfg))
    with pytest.raises(ValueError, match="etp=3 must be -1, 0 or a divisor of tp=2"):
        expert_layout_cost(64, 64, 48, 8, 2, 2, tp=2, ep=1, etp=3)
