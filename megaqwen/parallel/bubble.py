"""Pipeline bubbles, schedule by schedule: the idle fraction of one optimizer step on a pipeline rank.

Times are per model chunk (a rank holds v chunks; v = 1 for GPipe and 1F1B, 2 for the V schedules):
f the forward, b the backward for inputs, w the backward for weights (the full backward is b + w).
Unless given they are equal (f = b = w, the assumption of the zero-bubble papers; the 1F1B ratio of
backward to forward, 2:1, follows from it). A rank's useful time per step is m v (f + b + w); the
bubble is the idle time the schedule's warm-up and cool-down leave, and the fraction returned is
bubble / (useful + bubble):

  gpipe, 1f1b        (p-1)(f+b+w)                      -> (p-1)/(m+p-1)        Narayanan et al. 2021
  interleaved_1f1b   the same in chunks of 1/v         -> (p-1)/(v m+p-1)      ibid., eq. 2
  zero_bubble        ZB-H1: (p-1)(f+b-w)               -> (p-1)/(3 v m+p-1)    Qi et al. 2023, ZB-H1
  zbv                ZB-V: (p-1)(f+b-2w), never < 0    -> 0                    Qi et al. 2023, sec. 6
  dualpipev          (p-1)(F&B+B-3W) with F&B = f+b+w  -> (p-1)/(3m+p-1)       DeepSeek-V3 table 2
                     (two overlapped chunks take the sum of their compute) and B = b+w

DeepSeek-V3's table counts PP as stages, two per rank in DualPipeV, so its (PP/2-1) is (p-1) here.
Its schedule's gain is hiding the expert all-to-alls behind the other chunk's compute, which this
compute-only count leaves out (the planner's ep communication term is where that would go). ZB-V and
DualPipeV need m >= 2p micro-batches (the trainer refuses fewer: `parallel.pipeline.plan_pipeline`),
so below that no fraction is defined here either.
"""

from __future__ import annotations


def bubble_fraction(schedule: str, p: int, m: int, v: int = 1, f: float = 1.0, b: float = 1.0,
                    w: float = 1.0) -> float:
    """Idle fraction of a step on a pipeline of `p` ranks, `m` micro-batches, `v` chunks per rank
    under `schedule` (a key of `parallel.pipeline.SCHEDULES`), with chunk times f, b, w."""
    if p <= 1:
        return 0.0
    if schedule in ("zbv", "dualpipev"):
        if v != 2:
            raise ValueError(f"{schedule} places exactly 2 chunks per rank, got v={v}")
        if m < 2 * p:
            raise ValueError(f"{schedule} with p={p} needs m >= 2p = {2 * p} micro-batches, got {m}")
    idle = {
        "gpipe": f + b + w,
        "1f1b": f + b + w,
        "interleaved_1f1b": f + b + w,
        "zero_bubble": f + b - w,
        "zbv": f + b - 2 * w,
        "dualpipev": (f + b + w) + (b + w) - 3 * w,
    }
    if schedule not in idle:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; choose from {' | '.join(idle)}")
    if schedule in ("gpipe", "1f1b") and v != 1:
        raise ValueError(f"{schedule} runs one chunk per rank, got v={v}")
    bubble = max(0.0, (p - 1) * idle[schedule])
    return bubble / (m * v * (f + b + w) + bubble)
