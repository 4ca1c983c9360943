"""The step-time model: per-schedule bubbles, FSDP/ZeRO-3 gathers per micro-batch, GEMM-size
efficiency (experts' small GEMMs get less), ties within the error band."""

from __future__ import annotations

import pytest

from megaqwen.models.config import get_config
from megaqwen.parallel.bubble import bubble_fraction
from megaqwen.plan.memory import GPUS, Layout
from megaqwen.plan.perf import (
    DEFAULT_EFFICIENCY,
    ERROR_BAND,
    StepEstimate,
    dp_exposed_s,
    estimate_step,
    gemm_time,
)
from megaqwen.plan.search import Plan, tied


@pytest.mark.parametrize("schedule, v, want", [
    ("gpipe", 1, 3 / (8 + 3)),
    ("1f1b", 1, 3 / (8 + 3)),
    ("interleaved_1f1b", 2, 3 / (16 + 3)),
    ("zero_bubble", 2, 3 / (48 + 3)),  # ZB-H1: (p-1)(F+B-W) = (p-1)F per chunk
    ("zbv", 2, 0.0),  # (p-1)(F+B-2W) = 0
    ("dualpipev", 2, 3 / (24 + 3)),  # DeepSeek-V3 table 2: (PP/2-1)(F&B+B-3W), PP = 2p stages
])
def test_bubble_per_schedule_with_equal_f_b_w(schedule, v, want):
    assert bubble_fraction(schedule, 4, 8, v) == pytest.approx(want)


def test_bubble_with_unequal_times_and_refusals():
    # ZB-V keeps a bubble when the weight-gradient pass is too short to fill the cool-down
    assert bubble_fraction("zbv", 4, 8, 2, f=1, b=1, w=0.5) == pytest.approx(3 * 1 / (16 * 2.5 + 3))
    assert bubble_fraction("1f1b", 1, 8) == 0.0
    with pytest.raises(ValueError, match="needs m >= 2p = 8"):
        bubble_fraction("zbv", 4, 6, 2)
    with pytest.raises(ValueError, match="unknown pipeline schedule"):
        bubble_fraction("1f2b", 4, 8)


def test_gemm_efficiency_rises_with_size_and_saturates():
    gpu = GPUS["h100"]
    eff = [(lambda f, t: f / t / gpu.peak_flops)(*gemm_time(gpu, m, 4096, 4096, DEFAULT_EFFICIENCY))
           for m in (16, 256, 4096, 65536)]
    assert eff == sorted(eff) and eff[0] < 0.06 and 0.6 < eff[-1] < DEFAULT_EFFICIENCY


def test_expert_gemms_are_less_efficient_than_dense_ones_of_the_same_flops():
    """An MoE's experts see tokens x top-k / experts rows each: its GEMMs reach less of the peak than
    the dense model's, and expert parallelism (more rows per expert) wins some of it back."""
    gpu, moe = GPUS["h200"], get_config("qwen2-57b-a14b")
    dense = estimate_step(get_config("qwen2.5-14b"), Layout(dp=64, dp_mode="fsdp"), gpu, 4096, 256)
    one = estimate_step(moe, Layout(dp=64, dp_mode="fsdp"), gpu, 4096, 256)
    ep8 = estimate_step(moe, Layout(dp=64, ep=8, dp_mode="fsdp"), gpu, 4096, 256)
    assert one.gemm_efficiency < ep8.gemm_efficiency and one.gemm_efficiency < dense.gemm_efficiency


def test_fsdp_and_zero3_gather_per_micro_batch():
    """The trainer re-gathers FSDP parameters in every micro-batch's forward and backward, and reduces
    gradients once (grad_sync on the last): with no compute to hide behind, the exposed time grows
    with micro-batches by two gathers each; ZeRO-3 also reduce-scatters every micro-batch."""
    m, gpu = get_config("qwen2.5-7b"), GPUS["h100"]
    lay = Layout(dp=16, dp_mode="fsdp")
    one, four = (dp_exposed_s(m, lay, gpu, k, 0.0, 0.0) for k in (1, 4))
    n = m.num_params()
    ring = 15 / 16 * n / gpu.inter_bw
    assert one == pytest.approx(2 * 2 * ring + 4 * ring)
    assert four - one == pytest.approx(3 * 2 * 2 * ring)
    z3 = Layout(dp=16, dp_mode="zero3")
    assert dp_exposed_s(m, z3, gpu, 4, 0.0, 0.0) == pytest.approx(4 * (2 * 2 * ring + 2 * ring))
    ddp = Layout(dp=16, dp_mode="ddp")  # all-reduce once per step
    assert dp_exposed_s(m, ddp, gpu, 4, 0.0, 0.0) == dp_exposed_s(m, ddp, gpu, 1, 0.0, 0.0)
    assert dp_exposed_s(m, ddp, gpu, 4, 0.0, 1e9) == 0.0  # hidden behind a long backward


def test_rankings_within_the_error_band_are_ties():
    def plan(step_s):
        return Plan(Layout(), None, StepEstimate(step_s, 0, 0, 0, 0, 0, 0, 0, 0))
    times = [1.0, 1.0 + ERROR_BAND / 2, 1.0 + ERROR_BAND * 1.5, 1.0 + ERROR_BAND * 1.9, 2.0]
    assert tied([plan(t) for t in times]) == [1, 1, 3, 3, 5]
