"""Expert parallelism against one process: debug-moe (vocab 1024), dropless, fp32.

Every rank first trains the unsharded model on the whole global batch (plain PyTorch), then each
layout as a run of the trainer (its Config, builders and `train_step`: trainer_harness.py) on its
dp slice; rank 0 reports the first losses, every parameter's gradient as the optimizer gets it at
the first step (expert grads gathered from the ranks holding them), the grad norm, the z-loss and
the expert load. One spawn per world size, several layouts each. A `replay` layout's batches carry
routing to replay (`ROUTED_EXPERTS`, as grpo.routing_replay's rows do), and so does its reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from megaqwen.models.config import get_config
from megaqwen.models.outputs import ROUTED_EXPERTS
from megaqwen.models.spec import get_spec
from megaqwen.parallel.config import ParallelConfig
from megaqwen.parallel.dims import ParallelDims
from megaqwen.parallel.expert_parallel import collect_load, update_routing_bias
from megaqwen.train.config import TrainConfig
from tests.parallel.parallel_harness import gather_full, spawn
from tests.parallel.trainer_harness import (
    Run,
    build_run,
    capture_grads,
    layout_config,
    reference_adamw,
    run_steps,
)

# aux-free bias steps: in sync? The HF aux loss (a product of means over the batch) is off: the dp
# ranks' aux losses do not average to the whole batch's, so no single-process run equals it
CFG = dict(vocab_size=1024, moe_routing_bias_update_rate=0.01, router_aux_loss_coef=0.0)
STEPS, GLOBAL_B, T, LR, SEED = 3, 4, 16, 3e-3, 1234


def _cfg():
    return get_config("debug-moe", **CFG)


def _batches(cfg):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, cfg.vocab_size, (STEPS, GLOBAL_B, T + 1), generator=g)
    return ids[..., :-1], ids[..., 1:]


def _routed(cfg) -> torch.Tensor:
    """(STEPS, B, T, layers, K) experts to replay: random distinct ones per token, -1 (the router's
    choice) in dense layers and for the last quarter of each row."""
    g = torch.Generator().manual_seed(8)
    n = STEPS * GLOBAL_B * T * cfg.num_layers
    r = torch.rand(n, cfg.num_experts, generator=g).argsort(-1)[:, :cfg.num_experts_per_tok]
    r = r.view(STEPS, GLOBAL_B, T, cfg.num_layers, -1).to(torch.int16)
    r[:, :, 3 * T // 4:] = -1
    r[:, :, :, [i for i in range(cfg.num_layers) if not cfg.is_sparse_layer(i)]] = -1
    return r


def _reference(cfg, replay: bool = False):
    """One process, plain PyTorch: the whole global batch per step, the runs' AdamW settings."""
    model = get_spec(cfg).build(cfg, seed=SEED)
    opt = reference_adamw(model, TrainConfig(lr=LR))
    tokens, labels = _batches(cfg)
    routed = _routed(cfg) if replay else None
    losses = []
    for s in range(STEPS):
        parts = model(tokens[s], labels[s], batch={ROUTED_EXPERTS: routed[s]} if replay else None)
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


def _global_batches(cfg, replay: bool = False) -> list[dict[str, torch.Tensor]]:
    tokens, labels = _batches(cfg)
    out = [{"tokens": tokens[s], "labels": labels[s], "position_ids": torch.arange(T).expand(GLOBAL_B, T),
            "document_ids": torch.zeros_like(tokens[s])} for s in range(STEPS)]
    if replay:
        for b, r in zip(out, _routed(cfg)):
            b[ROUTED_EXPERTS] = r
    return out


def _layout_run(cfg, world: int, ep: int, fsdp: bool = False, tp: int = 1, sp: bool = False,
                recompute: str = "none") -> Run:
    """The trainer's assembly of the layout (its Config and builders), one micro-batch per dp rank."""
    pcfg = ParallelConfig(ep=ep, tp=tp, sequence_parallel=sp, recompute=recompute,
                          dp_mode="fsdp" if fsdp else "ddp")
    dp = world // tp
    return build_run(layout_config(cfg, pcfg, STEPS, GLOBAL_B, GLOBAL_B // dp, T, LR, SEED))


def _run(cfg, ref, world: int, ep: int, fsdp: bool = False, ckpt_dir: str | None = None, tp: int = 1,
         sp: bool = False, recompute: str = "none", replay: bool = False):
    """The layout through the trainer's builders and `train_step` (tests/parallel/trainer_harness)."""
    run = _layout_run(cfg, world, ep, fsdp, tp, sp, recompute)
    plain, fqns = run.plain, run.shards.expert_fqns
    seen = capture_grads(run, gather_full)  # after the expert (edp) reduction, as the optimizer gets them
    metrics = run_steps(run, _global_batches(cfg, replay))
    first = metrics[0]
    grad_err = {n: ((g - ref["grads"][n]).abs().max() / ref["grads"][n].abs().max().clamp(min=1e-12)).item()
                for n, g in seen["grads"].items()}
    loads = first["_moe_loads"]  # summed over the dp ranks
    load_err = max((loads[n].load_E - ref["load"][n]).abs().max().item() for n in ref["load"])
    # every expert of every sparse layer is held by exactly one rank of each ep block
    held = torch.tensor([sum(1 for n in fqns if n.endswith("up_proj.weight"))])
    dist.all_reduce(held)
    worst = max(grad_err, key=grad_err.get)
    worst_all = torch.tensor([grad_err[worst]])
    dist.all_reduce(worst_all, op=dist.ReduceOp.MAX)  # expert grads are checked where they live
    bias_err = max((b.routing_bias.full_tensor() if isinstance(b.routing_bias, DTensor) else b.routing_bias)
                   .sub(ref["bias"][n]).abs().max().item() for n, b in plain.moe_blocks().items())
    dcp_err = _dcp_into_one_process(plain, cfg, ckpt_dir) \
        if ckpt_dir and not fsdp and recompute == "none" and not replay else None
    return dict(load={n: ld.load_E.tolist() for n, ld in loads.items()},
                loss_rel=max(abs(m["loss"] - r) / abs(r) for m, r in zip(metrics, ref["losses"])),
                grad_err=worst_all.item(), worst=worst, norm_rel=abs(first["grad_norm"] / ref["norm"] - 1),
                load_err=load_err, z_rel=abs(first["z_loss"] / ref["z"] - 1), experts_held=held.item(),
                local_experts=len(fqns) // 3, bias_err=bias_err, dcp_err=dcp_err)


def _capacity_losses(world: int, ep: int) -> list[float]:
    """Losses with a capacity factor (drops happen on each rank's own tokens, before dispatch), and
    the tokens dropped, summed over ranks: with the same dp split they must not depend on ep."""
    cfg = get_config("debug-moe", vocab_size=1024, moe_capacity_factor=1.0)
    metrics = run_steps(_layout_run(cfg, world, ep), _global_batches(cfg))
    dropped = sum(ld.dropped for m in metrics for ld in m["_moe_loads"].values())
    return [m["loss"] for m in metrics] + [dropped]


def _name(layout: dict) -> str:
    """ep2-fsdp-tp2-sp-full: ep, then whatever differs from the defaults."""
    defaults = dict(fsdp=False, tp=1, sp=False, recompute="none", replay=False)
    tags = dict(fsdp="fsdp", tp=f"tp{layout.get('tp')}", sp="sp", recompute=layout.get("recompute"),
                replay="replay")
    changed = [tags[k] for k in defaults if layout.get(k, defaults[k]) != defaults[k]]
    return "-".join([f"ep{layout['ep']}", *changed])


def _worker(rank: int, world: int, layouts: list[dict], ckpt_dir: str | None = None,
            capacity: bool = False):
    cfg = _cfg()
    refs = {replay: _reference(cfg, replay) for replay in {lay.get("replay", False) for lay in layouts}}
    out = {_name(lay): _run(cfg, refs[lay.get("replay", False)], world, ckpt_dir=ckpt_dir, **lay)
           for lay in layouts}
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
    # replay (grpo.routing_replay's rows) under ep with recompute: the re-run forward dispatches the
    # replayed experts again
    out = spawn(_worker, 2, [dict(ep=2), dict(ep=2, fsdp=True), dict(ep=2, recompute="full"),
                             dict(ep=2, recompute="full", replay=True)], str(tmp_path / "ckpt"), True)
    assert {"ep2", "ep2-fsdp", "ep2-full", "ep2-full-replay"} == set(out) - {"capacity"}
    _check(out, 2, 2, cfg.num_experts)
    assert out["ep2-full-replay"]["load"] != out["ep2"]["load"]  # the replay routed otherwise
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
