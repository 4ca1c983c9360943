"""The big Qwen MoE models at cluster scale: a planner layout for each at a published cluster size,
assembled by the trainer's own `parallelize` on a simulated world (fake process group, meta
tensors), and the planner's per-rank expert FLOPs and all-to-all bytes against closed forms.

Cluster sizes (H100s): Qwen2-57B-A14B on 128 (16 nodes), Qwen3-30B-A3B on 64, Qwen3-235B-A22B on
256 (the size Megatron-Core's memory studies of 235B use, e.g. TP2 PP8 EP8-32 on 256 GPUs). Qwen's
reports give no GPU counts; these are the common public recipes' scale.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.distributed as dist

from megaqwen.models.config import get_config
from megaqwen.plan.cli import main
from megaqwen.plan.memory import GPUS, Layout, rank_param_count, routed_experts
from megaqwen.plan.perf import expert_cost
from megaqwen.plan.search import evaluate

SEQ, GLOBAL_BATCH = 4096, 1024
BIG = {  # model: (GPUs, the layout); etp=1: experts whole, ep spanning tp ranks (rows split over tp)
    "qwen2-57b-a14b": (128, Layout(tp=4, ep=8, dp=32, dp_mode="fsdp")),
    "qwen3-30b-a3b": (64, Layout(tp=4, etp=1, ep=16, dp=16, dp_mode="zero1")),
    "qwen3-235b-a22b": (256, Layout(tp=4, pp=2, etp=1, ep=32, dp=32, dp_mode="zero1", recompute="full")),
}


def _one_process_expert_flops(m, tokens: int) -> float:
    """Routed-expert GEMM FLOPs of a step in one process: 2 x 3 (forward + backward) per weight
    element of each active expert, per token and sparse layer."""
    moe = routed_experts(m)
    per_expert = sum(math.prod(s) for s in moe.expert_shapes)
    return 6.0 * tokens * moe.sparse_layers * moe.active * per_expert


@pytest.mark.parametrize("name", BIG)
def test_planner_layout_fits_with_expert_flops_and_all_to_all_per_rank(name):
    gpus, lay = BIG[name]
    m = get_config(name)
    assert lay.world == gpus
    p = evaluate(m, lay, GPUS["h100"], SEQ, GLOBAL_BATCH)  # the trainer's validation accepts it
    assert p.memory.fits and p.step is not None, (name, p.memory.total, p.error)
    tokens = GLOBAL_BATCH * SEQ
    # no repeated expert work: the step's expert FLOPs split evenly over all ranks
    assert p.step.expert_flops == pytest.approx(_one_process_expert_flops(m, tokens) / gpus, rel=1e-9)
    # experts whole on every tp rank (etp=0): each tp rank repeats the whole tp group's expert work
    rep = evaluate(m, Layout(**{**lay.__dict__, "etp": 0}), GPUS["h100"], SEQ, GLOBAL_BATCH)
    assert rep.step.expert_flops == pytest.approx(lay.tp * p.step.expert_flops, rel=1e-9)
    # all-to-all: each rank sends its rows (its dp rank's tokens, cut in tp/etp parts) x top-k,
    # 4 times per sparse layer of its stage (dispatch, combine; forward, backward), (ep-1)/ep leave it
    moe = routed_experts(m)
    rows = tokens / lay.dp / lay.expert_parts * moe.active
    want = 4 * rows * m.hidden_size * 2 * (lay.ep - 1) / lay.ep * moe.sparse_layers / lay.pp
    assert p.step.a2a_bytes == pytest.approx(want, rel=1e-9)
    # the timed GEMMs' expert FLOPs (from the spec's shapes) equal the runtime's arithmetic
    # (`expert_layout_cost`, which the MoE benchmark checks against the dispatcher's counters)
    micro = GLOBAL_BATCH // (lay.micro_batch * lay.dp)
    assert p.step.expert_flops == pytest.approx(micro * expert_cost(m, lay, SEQ).expert_flops, rel=1e-9)


def _assemble(m, lay: Layout, rank: int) -> tuple[int, int]:
    """(parameter elements rank `rank` holds, the planner's count for it) after the trainer's
    validation and `parallelize` on a fake world of lay.world ranks, all on meta."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megaqwen.models.spec import get_spec
    from megaqwen.parallel.dims import ParallelDims
    from megaqwen.parallel.setup import DistEnv, accumulation_steps, parallelize, validate_layout
    from megaqwen.parallel.shards import local_param_bytes

    pcfg = lay.parallel_config()
    dims = ParallelDims.from_config(pcfg, lay.world)
    micro = accumulation_steps(GLOBAL_BATCH, lay.micro_batch, lay.dp)
    plan = validate_layout(pcfg, dims, m, SEQ, "native", micro)
    dist.init_process_group("fake", rank=rank, world_size=lay.world, store=FakeStore())
    try:
        mesh = dims.build_mesh("cpu")
        env = DistEnv(rank, lay.world, 0, torch.device("cpu"), dims, mesh)
        spec = get_spec(m)
        model = spec.build(m, device="meta")
        shards = parallelize(model, spec, pcfg, env, plan=plan)
        assert all(p.device.type == "meta" for p in model.parameters()), "memory was touched"
        assert shards.ep_groups is not None and shards.ep_groups.ep == lay.ep
        pp_rank = mesh.rank("pp") if lay.pp > 1 else 0
        return local_param_bytes(model) // 4, rank_param_count(m, lay, pp_rank, mesh.dp_rank)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_big_moe_layouts_assemble_on_a_fake_world_at_cluster_size(monkeypatch):
    """The last rank of each layout (last pipeline stage, last ep and edp positions, FSDP's last
    chunk), and rank 0 of the two smaller ones: the process-group mesh (ep/edp groups included) and
    the parallelized meta skeleton build, and hold exactly what the planner counts for that rank."""
    # nn.Linear's init on meta only burns time (2/3 of building 235B's 37k linears); materialising
    # initialises every tensor by name anyway
    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", lambda self: None)
    t0 = time.perf_counter()
    for name, (gpus, lay) in BIG.items():
        m = get_config(name)
        for rank in (0, gpus - 1) if gpus < 256 else (gpus - 1,):
            got, want = _assemble(m, lay, rank)
            assert got == want, (name, rank, got, want)
    assert time.perf_counter() - t0 < 180


def test_cli_prints_expert_columns_and_exits_nonzero_when_nothing_fits(capsys):
    gpus, lay = BIG["qwen3-30b-a3b"]
    args = [f"{k}={getattr(lay, k)}" for k in ("tp", "etp", "ep", "dp", "dp_mode")]
    assert main(["model=qwen3-30b-a3b", f"gpus={gpus}", f"global_batch={GLOBAL_BATCH}", *args]) == 0
    out = capsys.readouterr().out
    assert "exp TF" in out and "a2a GiB" in out
    # 30B on one GPU: no layout fits; the reason on stdout, a non-zero exit; so for one given layout
    for extra in ([], ["tp=1"]):
        assert main(["model=qwen3-30b-a3b", "gpus=1", "global_batch=64", *extra]) == 1
        captured = capsys.readouterr()
        assert ("DOES NOT FIT" if extra else "no layout fits in memory") in captured.out
        assert captured.err == "megaqwen-plan: no layout fits (the reason is above)\n"
