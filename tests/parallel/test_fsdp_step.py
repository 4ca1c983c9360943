"""FSDP2 with 4 micro-batches per step: the parameter all-gathers counted per step (both policies of
parallel.fsdp_keep_gathered) equal the planner's model of them, and the two policies train alike.

Two gloo ranks, dp=2 fsdp, the debug model (2 layers, 1,024-row vocabulary), global batch 8 of
micro-batches of 1 row: 4 micro-batches per rank and step, run through the trainer's own builders
and `train_step` (trainer_harness)."""

from __future__ import annotations

import pytest
import torch
import trainer_harness as trainer
from parallel_harness import spawn

from megaqwen.models.config import get_config
from megaqwen.parallel.config import ParallelConfig
from megaqwen.parallel.fsdp_step import count_param_all_gathers
from megaqwen.plan.perf import fsdp_all_gathers_per_step

STEPS, GLOBAL_B, MICRO, T = 2, 8, 1, 16
POLICIES = [(True, False), (True, True)]  # (reshard_after_forward, keep_gathered)


def _batches(cfg) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, cfg.vocab_size, (STEPS, GLOBAL_B, T + 1), generator=g)
    pos = torch.arange(T).expand(GLOBAL_B, T).contiguous()
    return [{"tokens": ids[s, :, :-1], "labels": ids[s, :, 1:], "position_ids": pos,
             "document_ids": torch.zeros(GLOBAL_B, T, dtype=torch.long)} for s in range(STEPS)]


def _worker(rank: int, world: int) -> dict:
    cfg = get_config("debug", vocab_size=1024)
    out = {}
    for raf, keep in POLICIES:
        pcfg = ParallelConfig(dp=world, dp_mode="fsdp", fsdp_reshard_after_forward=raf,
                              fsdp_keep_gathered=keep)
        run = trainer.build_run(trainer.layout_config(cfg, pcfg, STEPS, GLOBAL_B, MICRO, T, 3e-3, 1234))
        counts, losses = [], []
        for batch in _batches(cfg):
            with count_param_all_gathers() as n:
                losses += [m["loss"] for m in trainer.run_steps(run, [batch])]
            counts.append(n.total)
        out[(raf, keep)] = {"counts": counts, "losses": losses, "accum": run.accum_steps,
                            "by_unit": n.by_unit}
    return out


@pytest.mark.distributed
def test_fsdp_all_gathers_per_step_match_policy_and_planner():
    res = spawn(_worker, 2)
    layers = get_config("debug").num_layers
    ref = res[(True, False)]["losses"]
    for (raf, keep), r in res.items():
        assert r["accum"] == 4
        want = fsdp_all_gathers_per_step(layers, 4, reshard_after_forward=raf, keep_gathered=keep)
        assert r["counts"] == [want] * STEPS, ((raf, keep), r["counts"], want, r["by_unit"])
        # the policies change when weights are gathered, not what is computed
        assert r["losses"] == pytest.approx(ref, rel=1e-6), (raf, keep)
    # the keep policy gathers each of the L + 1 units once a step; reshard 4 (2L + 1) times
    assert res[(True, True)]["counts"][0] == layers + 1
    assert res[(True, False)]["counts"][0] == 4 * (2 * layers + 1)


def test_planner_prices_keep_gathered_in_memory_and_time():
    """The policy's trade as the planner sees it: keep_gathered holds every layer's bf16 weights
    (more memory) and all-gathers once per step (less exposed communication) at 4 micro-batches."""
    from megaqwen.plan.memory import GPUS, Layout, estimate_memory
    from megaqwen.plan.perf import estimate_step

    m = get_config("qwen2.5-1.5b")
    lays = {keep: Layout(dp=8, dp_mode="fsdp", fsdp_keep_gathered=keep) for keep in (False, True)}
    mem = {k: estimate_memory(m, lay, 4096, 4) for k, lay in lays.items()}
    step = {k: estimate_step(m, lay, GPUS["h100"], 4096, 32) for k, lay in lays.items()}
    assert mem[True].gathered > mem[False].gathered
    assert step[True].dp_exposed_s <= step[False].dp_exposed_s
    assert fsdp_all_gathers_per_step(m.num_layers, 4, keep_gathered=True) == m.num_layers + 1


def test_keep_gathered_refused_where_no_fsdp_units_persist():
    from megaqwen.parallel.dims import ParallelDims
    from megaqwen.parallel.setup import validate_layout

    pcfg = ParallelConfig(dp=2, dp_mode="ddp", fsdp_keep_gathered=True)
    with pytest.raises(ValueError, match="fsdp_keep_gathered=true needs"):
        validate_layout(pcfg, ParallelDims(world_size=2, dp=2), get_config("debug"), 16)
