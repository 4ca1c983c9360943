"""Qwen3 and Qwen3-MoE under every layout kind == one process (fp32, gloo on CPU, rel <= 1e-5).

The proof that the contracts hold: the layouts run through the same harnesses and checks as the
Qwen2 debug models (test_parity, test_expert_parallel, test_context_parallel, test_pipeline), only
with `debug-qwen3` (QK-norm, head_dim 24 != hidden / heads) and `debug-qwen3-moe` (+ 8 experts top-2
renormalised, no shared expert). Nothing in megaqwen/parallel knows these architectures.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from parallel_harness import Layout, reference, run_layout, spawn

from megaqwen.models.config import get_config

pytestmark = pytest.mark.distributed


def _dense():
    return get_config("debug-qwen3", vocab_size=1024)


def _moe(**kw):
    # the aux-free bias moves every step (as in test_expert_parallel): its updates must agree too;
    # HF's aux loss is off there (the dp ranks' aux losses do not average to the whole batch's)
    return get_config("debug-qwen3-moe", **{"vocab_size": 1024, "moe_routing_bias_update_rate": 0.01,
                                            "router_aux_loss_coef": 0.0, **kw})


# ------------------------------------------------------------------------------ tp2, dp2 FSDP (dense)


def _parity_worker(rank: int, world: int, layouts: list[Layout]) -> dict:
    cfg = _dense()
    ref = reference(cfg)
    out = {"ref_losses": ref["losses"], "ref_grad_norm": ref["grad_norm"],
           "ref_torch_grad_norm": ref["torch_grad_norm"]}
    out.update({layout.name: run_layout(cfg, layout, world, ref) for layout in layouts})
    return out


def test_qwen3_tp2_sp_and_dp2_fsdp_equal_one_process():
    from test_parity import _check

    layouts = [Layout(tp=2), Layout(tp=2, sp=True), Layout(dp=2, mode="fsdp"),
               Layout(tp=2, sp=True, recompute="selective")]
    _check(spawn(_parity_worker, 2, layouts), layouts)


def test_qwen3_tp4_kv_replicated_and_tp2_dp2_fsdp_equal_one_process():
    """tp=4 > 2 KV heads: each k_norm sees one replicated KV head per rank, its grad still summed once."""
    from test_parity import _check

    layouts = [Layout(tp=4), Layout(tp=4, sp=True), Layout(tp=2, dp=2, mode="fsdp", sp=True)]
    _check(spawn(_parity_worker, 4, layouts), layouts)


# ------------------------------------------------------------------------------ ep2, tp2, dp2 FSDP (MoE)


def _moe_worker(rank: int, world: int, layouts: list[dict]) -> dict:
    import test_expert_parallel as ep

    cfg = _moe()
    ref = ep._reference(cfg)
    return {ep._name(lay): ep._run(cfg, ref, world, **lay) for lay in layouts}


def test_qwen3_moe_ep2_tp2_and_fsdp_equal_one_process():
    import test_expert_parallel as ep

    cfg = _moe()
    out = spawn(_moe_worker, 2, [dict(ep=2), dict(ep=2, fsdp=True), dict(ep=1, tp=2),
                                 dict(ep=1, tp=2, sp=True), dict(ep=1, fsdp=True)])
    assert set(out) == {"ep2", "ep2-fsdp", "ep1-tp2", "ep1-tp2-sp", "ep1-fsdp"}
    ep._check(out, 2, sum(cfg.is_sparse_layer(i) for i in range(cfg.num_layers)), cfg.num_experts)


# ------------------------------------------------------------------------------ cp2


def _cp_worker(rank: int, world: int, cfg, layouts: list[tuple]) -> dict:
    import test_context_parallel as cp

    ref = cp.model_reference(cfg)
    out = {"ref": ref["losses"]}
    for tp, cp_, dp, mode in layouts:
        out[f"tp{tp}-cp{cp_}-dp{dp}-{mode}"] = cp.run_model_layout(cfg, world, tp, cp_, dp, mode, ref)
    return out


def test_qwen3_cp2_ring_and_alltoall_equal_one_process():
    from test_context_parallel import _check_model

    res = spawn(_cp_worker, 2, _dense(), [(1, 2, 1, "ring"), (1, 2, 1, "alltoall")])
    assert len(res) == 3
    _check_model(res)


def test_qwen3_moe_cp2_equals_one_process():
    """MoE x cp, the LM loss (the reference, test_context_parallel.model_reference,
    trains the LM loss only and wants a grad on every parameter: no aux-free bias here; the balancing
    losses under cp: tests/parallel/test_moe_balance_layouts.py)."""
    from test_context_parallel import _check_model

    from megaqwen.parallel.config import ParallelConfig
    from megaqwen.parallel.dims import ParallelDims
    from megaqwen.parallel.setup import validate_layout

    cfg = _moe(moe_routing_bias_update_rate=0.0)
    validate_layout(ParallelConfig(cp=2), ParallelDims(world_size=2, cp=2), cfg, 32)  # the trainer's check
    _check_model(spawn(_cp_worker, 2, cfg, [(1, 2, 1, "ring")]))


# ------------------------------------------------------------------------------ pp2


def _pp_worker(rank: int, world: int, cases: list[tuple], global_b: int, mbs: int) -> dict:
    from tests.parallel.test_pipeline import _reference, _run_layout

    out, refs = {}, []  # one single-process reference per config
    for name, cfg, lay in cases:
        ref = next((r for c, r in refs if c == cfg), None)
        if ref is None:
            ref = _reference(cfg, global_b)
            refs.append((cfg, ref))
        out[name] = _run_layout(rank, world, cfg, lay, ref, global_b, mbs)
    return out


def test_qwen3_pp2_equals_one_process():
    """pp=2, 4 micro-batches of 1: Qwen3 (8 layers, tied head on both ends) under 1F1B and
    interleaved 1F1B, Qwen3-MoE (pipelines take the z-loss and the aux-free bias, not HF's aux loss)."""
    from tests.parallel.test_pipeline import _check

    dense = replace(_dense(), num_layers=8)
    moe = _moe(router_aux_loss_coef=0.0, router_z_loss_coef=0.01, moe_routing_bias_update_rate=0.0)
    cases = [("qwen3-1f1b", dense, {"pp": 2, "schedule": "1f1b"}),
             ("qwen3-interleaved-v2", dense, {"pp": 2, "schedule": "interleaved_1f1b", "v": 2}),
             ("qwen3-moe-1f1b", moe, {"pp": 2, "schedule": "1f1b"})]
    out = spawn(_pp_worker, 2, cases, 4, 1)
    assert set(out) == {name for name, _, _ in cases}
    _check(out)
