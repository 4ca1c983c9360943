"""Every layout of the debug model == one process, same seed and global batch (fp32, gloo on CPU)."""

from __future__ import annotations

import os

import pytest
from parallel_harness import Layout, global_batches, layout_config, parity_worker, spawn

LOSS_RTOL = 1e-5  # the bar for fp32 losses over the first steps
GRAD_RTOL = 1e-5  # max |g - g_ref| / max |g_ref| per parameter after the first backward

pytestmark = pytest.mark.distributed


def _check(results: dict, layouts: list[Layout]) -> None:
    for layout in layouts:
        r = results[layout.name]
        # meta build + per-rank materialisation: the gathered full weights are the single process's
        assert r["init_equal"], (layout.name, "initial weights differ from the single-process ones")
        assert r["loss_rel"] <= LOSS_RTOL, (layout.name, r["losses"], results["ref_losses"])
        assert r["grad_err"] <= GRAD_RTOL, (layout.name, r["worst_grad"], r["grad_err"])
        assert r["grad_norm_rel"] <= GRAD_RTOL, (layout.name, "global grad norm", r["grad_norm_rel"])
        if not layout.mode.startswith("ds"):  # DeepSpeed clips inside its own step
            assert r["clipped_norm_rel"] <= GRAD_RTOL, (layout.name, "clipped norm", r["clipped_norm_rel"])
    ref, by_torch = results["ref_grad_norm"], results["ref_torch_grad_norm"]
    assert abs(ref / by_torch - 1) <= 1e-6, ("single-process grad norm vs torch's", ref, by_torch)


def test_two_ranks_tp_sp_ddp_zero1_fsdp():
    # micro=1 / 2: gradient accumulation over 2 micro-batches per rank (DDP, FSDP2, TP alone)
    layouts = [Layout(tp=2), Layout(tp=2, sp=True), Layout(dp=2), Layout(dp=2, mode="zero1"),
               Layout(dp=2, mode="fsdp"), Layout(tp=2, sp=True, recompute="full"),
               Layout(dp=2, mode="fsdp", recompute="selective"), Layout(dp=2, micro=1),
               Layout(dp=2, mode="fsdp", micro=1), Layout(tp=2, micro=2)]
    _check(spawn(parity_worker, 2, layouts, {}), layouts)  # the debug model as shipped


def test_four_ranks_tp4_kv_replicated_and_tp2_dp2():
    # debug has 2 KV heads: tp=4 replicates each on 2 ranks
    layouts = [Layout(tp=4), Layout(tp=4, sp=True), Layout(tp=2, dp=2), Layout(tp=2, dp=2, sp=True),
               Layout(tp=2, dp=2, mode="zero1"), Layout(tp=2, dp=2, mode="fsdp"),
               Layout(tp=2, dp=2, mode="fsdp", sp=True), Layout(tp=2, dp=2, mode="fsdp", recompute="full")]
    _check(spawn(parity_worker, 4, layouts, {"vocab_size": 1024}), layouts)


@pytest.mark.slow
def test_deepspeed_zero_1_2_3():
    pytest.importorskip("deepspeed", reason="DeepSpeed not installed (pip install 'megaqwen[deepspeed]')")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    layouts = [Layout(dp=2, mode="ds1"), Layout(dp=2, mode="ds2"), Layout(dp=2, mode="ds3"),
               Layout(dp=2, mode="ds2", micro=1)]  # 2 micro-batches: DeepSpeed's own accumulation
    _check(spawn(parity_worker, 2, layouts, {"vocab_size": 1024}), layouts)


@pytest.mark.slow
def test_deepspeed_with_tensor_parallel():
    pytest.importorskip("deepspeed", reason="DeepSpeed not installed (pip install 'megaqwen[deepspeed]')")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    layouts = [Layout(tp=2, dp=2, mode="ds1"), Layout(tp=2, dp=2, mode="ds2", sp=True),
               Layout(tp=2, dp=2, mode="ds3", sp=True)]
    _check(spawn(parity_worker, 4, layouts, {"vocab_size": 1024}), layouts)


def _all_reduce_count_worker(rank: int, world: int) -> dict[int, int]:
    """DDP's gradient all-reduces (bucket launches) over STEPS steps, by micro-batches per rank."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from trainer_harness import build_run, run_steps

    from megaqwen.models.config import get_config

    cfg = get_config("debug", vocab_size=1024)
    out = {}
    for micro, accum in ((2, 1), (1, 2)):
        run = build_run(layout_config(cfg, Layout(dp=2, micro=micro)))
        calls = []

        def count(group, bucket, calls=calls):
            calls.append(1)
            return allreduce_hook(group, bucket)

        run.model.register_comm_hook(None, count)  # the dp group is the world here
        run_steps(run, global_batches(cfg))
        out[accum] = len(calls)
    return out


def test_ddp_accumulation_all_reduces_once_per_step():
    counts = spawn(_all_reduce_count_worker, 2)
    assert counts[1] > 0 and counts[2] == counts[1], counts
