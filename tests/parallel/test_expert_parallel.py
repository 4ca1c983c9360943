"""Expert parallelism against one process: debug-moe (vocab 1024), dropless, fp32.

Every rank first trains the unsharded model on the whole global batch, then each layout on its dp
slice; rank 0 reports the first losses, every parameter's gradient after the first backward (expert
grads gathered from the ranks holding them), the grad norm and the expert load. One spawn per world
size, several layouts each.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from megaqwen.models.config import get_config
from megaqwen.models.spec import get_spec
from megaqwen.parallel.activation import apply_recompute
from megaqwen.parallel.data_parallel import apply_fsdp, unwrap, wrap_ddp
from megaqwen.parallel.dims import ParallelDims
from megaqwen.parallel.expert_parallel import (
    apply_expert_parallel,
    apply_fsdp_experts,
    clip_grad_norm_ep_,
    collect_load,
    ddp_ignore_experts,
    ep_groups,
    reduce_expert_grads,
    update_routing_bias,
)
from megaqwen.parallel.materialize import materialize
from megaqwen.parallel.shards import ShardMap
from tests.parallel.parallel_harness import gather_full, spawn

CFG = dict(vocab_size=1024, moe_routing_bias_update_rate=0.01)  # aux-free bias steps: in sync?
STEPS, GLOBAL_B, T, LR, SEED = 3, 4, 16, 3e-3, 1234


def _cfg():
    return get_config("debug-moe", **CFG)


def _batches(cfg):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, cfg.vocab_size, (STEPS, GLOBAL_B, T + 1), generator=g)
    return ids[..., :-1], ids[..., 1:]


def _reference(cfg):
    model = get_spec(cfg).build(cfg, seed=SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    tokens, labels = _batches(cfg)
    losses = []
    for s in range(STEPS):
        parts = model(tokens[s], labels[s])
        loss = parts.mean()
        if s == 0:
            z = parts.z.item()  # a mean over tokens: the dp ranks' means average to it
        loss.backward()
        if s == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            norm = torch.nn.utils.get_total_norm(list(grads.values())).item()
            load = {n: b.load_E.float() for n, b in model.moe_blocks().items()}
        loads = collect_load(model)
        opt.step()
        opt.zero_grad()
        update_routing_bias(model, loads, cfg.moe_routing_bias_update_rate)
        losses.append(loss.item())
    bias = {n: b.routing_bias.clone() for n, b in model.moe_blocks().items()}
    assert any(b.any() for b in bias.values())  # the aux-free bias moved
    return dict(losses=losses, grads=grads, norm=norm, load=load, bias=bias, z=z)


def _dcp_into_one_process(plain, cfg, ckpt_dir: str) -> float:
    """Save the ep-sharded model with DCP, load it into an unsharded model on every rank: the
    largest difference to this rank's pieces (0: the checkpoint holds every expert by name)."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": plain.state_dict()}, checkpoint_id=ckpt_dir)
    full = get_spec(cfg).build(cfg, seed=0)  # other values: everything must be overwritten
    state = {"model": full.state_dict()}
    dcp.load(state, checkpoint_id=ckpt_dir)
    full.load_state_dict(state["model"])
    mine = plain.state_dict()
    assert len(mine) < len(state["model"])  # this rank holds only its experts
    return max((full.state_dict()[k] - v).abs().max().item() for k, v in mine.items())


def _run(cfg, ref, world: int, ep: int, fsdp: bool = False, ckpt_dir: str | None = None, tp: int = 1,
         sp: bool = False, recompute: str = "none"):
    dims = ParallelDims(world_size=world, ep=ep, tp=tp)
    mesh = dims.build_mesh("cpu")
    spec = get_spec(cfg)
    model = spec.build(cfg, device="meta")
    shards = spec.parallelize_tp(model, mesh, sequence_parallel=sp)
    groups = ep_groups(mesh, ep)
    fqns = apply_expert_parallel(model, groups)
    apply_recompute(spec.layers(model), recompute, spec.selective_recompute)
    if fsdp:
        apply_fsdp_experts(model, mesh, groups)
        apply_fsdp(model, mesh, spec.layers(model))
    materialize(model, shards, "cpu", seed=SEED)
    if not fsdp:
        ddp_ignore_experts(model, fqns)
    wrapped = model if fsdp else wrap_ddp(model, mesh)
    plain = unwrap(wrapped)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=LR, weight_decay=0.1)
    tokens, labels = _batches(cfg)
    b = GLOBAL_B // dims.dp
    sl = slice(mesh.dp_rank * b, (mesh.dp_rank + 1) * b)
    losses, grad_err, norm_rel, load_err = [], {}, 0.0, 0.0
    for s in range(STEPS):
        parts = wrapped(tokens[s, sl], labels[s, sl])
        loss = parts.mean()
        loss.backward()
        if s == 0:  # every sparse layer's routing reached the loss (also through FSDP2's wrappers)
            z = parts.z.detach().clone()
            dist.all_reduce(z, group=mesh.dp_group)
            z_rel = abs(z.item() / dims.dp / ref["z"] - 1)
        if not fsdp:
            reduce_expert_grads(plain, fqns, groups, bucket_elements=10_000)  # several buckets
        loads = collect_load(plain, mesh.dp_group)
        if s == 0:
            for n, p in plain.named_parameters():
                if not p.requires_grad:
                    continue
                g = gather_full(p.grad, n, shards)  # FSDP and TP pieces -> the full tensor
                r = ref["grads"][n]
                grad_err[n] = ((g - r).abs().max() / r.abs().max().clamp(min=1e-12)).item()
            norm = clip_grad_norm_ep_(plain.named_parameters(), float("inf"), shards, fqns, groups)
            norm_rel = abs(norm.item() / ref["norm"] - 1)
            load_err = max((loads[n].load_E - ref["load"][n]).abs().max().item() for n in ref["load"])
        opt.step()
        opt.zero_grad()
        update_routing_bias(plain, loads, cfg.moe_routing_bias_update_rate)
        loss = loss.detach().clone()
        dist.all_reduce(loss, group=mesh.dp_group)
        losses.append(loss.item() / dims.dp)
    # every expert of every sparse layer is held by exactly one rank of each ep block
    held = torch.tensor([sum(1 for n in fqns if n.endswith("up_proj.weight"))])
    dist.all_reduce(held)
    worst = max(grad_err, key=grad_err.get)
    worst_all = torch.tensor([grad_err[worst]])
    dist.all_reduce(worst_all, op=dist.ReduceOp.MAX)  # expert grads are checked where they live
    bias_err = max((b.routing_bias.full_tensor() if isinstance(b.routing_bias, DTensor) else b.routing_bias)
                   .sub(ref["bias"][n]).abs().max().item() for n, b in plain.moe_blocks().items())
    dcp_err = _dcp_into_one_process(plain, cfg, ckpt_dir) \
        if ckpt_dir and not fsdp and recompute == "none" else None
    return dict(loss_rel=max(abs(a - r) / abs(r) for a, r in zip(losses, ref["losses"])),
                grad_err=worst_all.item(), worst=worst, norm_rel=norm_rel, load_err=load_err, z_rel=z_rel,
                experts_held=held.item(), local_experts=len(fqns) // 3, bias_err=bias_err,
                dcp_err=dcp_err)


def _capacity_losses(world: int, ep: int) -> list[float]:
    """Losses with a capacity factor (drops happen on each rank's own tokens, before dispatch), and
    the tokens dropped, summed over ranks: with the same dp split they must not depend on ep."""
    cfg = get_config("debug-moe", vocab_size=1024, moe_capacity_factor=1.0)
    mesh = ParallelDims(world_size=world, ep=ep).build_mesh("cpu")
    model = get_spec(cfg).build(cfg, device="meta")
    groups = ep_groups(mesh, ep)
    fqns = apply_expert_parallel(model, groups)
    materialize(model, ShardMap(mesh), "cpu", seed=SEED)
    ddp_ignore_experts(model, fqns)
    wrapped = wrap_ddp(model, mesh)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=LR)
    tokens, labels = _batches(cfg)
    b = GLOBAL_B // world
    sl = slice(mesh.dp_rank * b, (mesh.dp_rank + 1) * b)
    out, dropped = [], 0.0
    for s in range(STEPS):
        loss = wrapped(tokens[s, sl], labels[s, sl]).mean()
        loss.backward()
        reduce_expert_grads(model, fqns, groups)
        dropped += sum(ld.dropped for ld in collect_load(model, mesh.dp_group).values())
        opt.step()
        opt.zero_grad()
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        out.append(loss.item() / world)
    return out + [dropped]


def _name(layout: dict) -> str:
    """ep2-fsdp-tp2-sp-full: ep, then whatever differs from the defaults."""
    defaults = dict(fsdp=False, tp=1, sp=False, recompute="none")
    tags = dict(fsdp="fsdp", tp=f"tp{layout.get('tp')}", sp="sp", recompute=layout.get("recompute"))
    changed = [tags[k] for k in defaults if layout.get(k, defaults[k]) != defaults[k]]
    return "-".join([f"ep{layout['ep']}", *changed])


def _worker(rank: int, world: int, layouts: list[dict], ckpt_dir: str | None = None,
            capacity: bool = False):
    cfg = _cfg()
    ref = _reference(cfg)
    out = {_name(lay): _run(cfg, ref, world, ckpt_dir=ckpt_dir, **lay) for lay in layouts}
    if capacity:
        out["capacity"] = {ep: _capacity_losses(world, ep) for ep in (1, world)}
    return out


def _check(out: dict, world: int, n_sparse: int, experts: int):
    for name, r in out.items():
        if name == "capacity":
            continue
        ep = int(name[2])
        assert r["loss_rel"] <= 1e-5, (name, r)
        assert r["grad_err"] <= 1e-5, (name, r)
        assert r["norm_rel"] <= 1e-5, (name, r)
        assert r["z_rel"] <= 1e-5, (name, r)
        assert r["load_err"] == 0, (name, r)
        assert r["bias_err"] == 0, (name, r)  # same global loads on every rank: same bias steps
        assert r["local_experts"] == n_sparse * experts // ep, (name, r)
        assert r["experts_held"] == n_sparse * experts * world // ep, (name, r)


@pytest.mark.distributed
@pytest.mark.slow
def test_ep2_world2_equals_one_process(tmp_path):
    cfg = _cfg()
    out = spawn(_worker, 2, [dict(ep=2), dict(ep=2, fsdp=True), dict(ep=2, recompute="full")],
                str(tmp_path / "ckpt"), True)
    assert {"ep2", "ep2-fsdp", "ep2-full"} == set(out) - {"capacity"}
    _check(out, 2, 2, cfg.num_experts)
    assert out["ep2"]["dcp_err"] == 0  # ep=2 checkpoint loads bit-exact into one process
    ep1, ep2 = out["capacity"][1], out["capacity"][2]
    assert ep1[-1] == ep2[-1] > 0  # the same assignments dropped, some
    assert max(abs(a - b) / abs(a) for a, b in zip(ep1[:-1], ep2[:-1])) <= 1e-5


@pytest.mark.distributed
@pytest.mark.slow
def test_ep4_ep2_x_edp2_and_ep2_x_tp2_sp_world4_equal_one_process():
    cfg = _cfg()
    # tp2 x dp2 with ep2 keeps attention TP-sharded and experts whole per TP rank
    out = spawn(_worker, 4, [dict(ep=4), dict(ep=2), dict(ep=2, fsdp=True), dict(ep=1),
                             dict(ep=2, tp=2), dict(ep=2, tp=2, sp=True)])
    assert {"ep4", "ep2", "ep2-fsdp", "ep1", "ep2-tp2", "ep2-tp2-sp"} == set(out)
    _check(out, 4, 2, cfg.num_experts)


def _refusal(cfg, **dims) -> str:
    """What the layout validation says of `cfg` under these degrees (the model's spec's rules)."""
    with pytest.raises(ValueError) as e:
        ParallelDims(**dims).validate_model(cfg, get_spec(cfg))
    return str(e.value)


def test_bad_expert_layout_is_refused_before_work():
    cfg = get_config("debug-moe")  # 8 experts
    assert "num_experts=8 is not divisible by ep=3; pick ep from [1, 2]" in _refusal(cfg, world_size=6, ep=3)
    ParallelDims(world_size=8, ep=8).validate_model(cfg, get_spec(cfg))
    with pytest.raises(ValueError, match=r"ep=4 must divide dp\*cp=6"):
        ParallelDims(world_size=6, ep=4)


def test_top_k_above_experts_is_refused():
    from dataclasses import replace

    cfg = replace(get_config("debug-moe"), num_experts=8, num_experts_per_tok=2)
    cfg.num_experts_per_tok = 9  # past the config's own check: the spec refuses it too
    assert "num_experts_per_tok=9 must be in [1, num_experts=8]" in _refusal(cfg, world_size=2, ep=2)
    with pytest.raises(ValueError, match=r"num_experts_per_tok=6 must be in \[1, num_experts=4\]"):
        get_config("debug-moe", num_experts=4, num_experts_per_tok=6)


def test_ep_on_dense_model_is_refused():
    assert "ep=2 needs an MoE model (arch 'qwen2' has no routed experts)" in \
        _refusal(get_config("debug"), world_size=2, ep=2)
