"""Property test of the LR schedules over many (steps, warmup, schedule_start, decay_fraction)
combinations: every decaying schedule ends at exactly min_lr on the last step (steps = warmup + 1
used to end at peak lr), warms up linearly, never rises after its peak and stays within [0, lr]."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from megaqwen.train.config import TrainConfig
from megaqwen.train.optim import lr_at

LR, MIN_LR = 3e-4, 3e-5


def _combinations():
    for steps, warmup, start in itertools.product(range(1, 41), range(0, 12), (0, 1, 3, 17)):
        if start < steps:  # Config.validate: schedule_start in [0, steps)
            yield steps, warmup, start


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_every_decaying_schedule_ends_at_min_lr_on_the_last_step(schedule):
    checked = 0
    for (steps, warmup, start), frac in itertools.product(_combinations(), (0.05, 0.2, 0.5, 1.0)):
        if schedule == "cosine" and frac != 0.2:
            continue  # decay_fraction is WSD's alone
        cfg = TrainConfig(steps=steps, warmup_steps=warmup, schedule_start=start, lr=LR, min_lr=MIN_LR,
                          schedule=schedule, decay_fraction=frac)
        n = steps - start  # the stage's own steps
        lrs = [lr_at(s, cfg) for s in range(start, steps)]
        case = f"steps={steps} warmup={warmup} schedule_start={start} decay_fraction={frac}: {lrs}"
        assert lrs[-1] == MIN_LR, case
        assert all(0 < x <= LR for x in lrs), case
        ramp = min(warmup, n - 1)  # warmup steps that are not the last step
        assert lrs[:ramp] == [LR * (i + 1) / warmup for i in range(ramp)], case
        peak = max(range(n), key=lrs.__getitem__)
        assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:])), case  # no rise after the peak
        if warmup < n - 1:  # room for a decay: the step before the last is still above min_lr
            assert lrs[-2] > MIN_LR, case
            # cosine peaks at lr itself (WSD with no warmup and no stable phase starts decaying at once)
            assert schedule != "cosine" or lrs[peak] == LR, case
        if start:  # a stage's schedule is the whole schedule of a run of its length
            assert lrs == [lr_at(s, replace(cfg, steps=n, schedule_start=0)) for s in range(n)], case
        checked += 1
    assert checked > 1000


def test_steps_equal_warmup_plus_one_decays():
    """The issue's case: six-step runs (warmup 5) ended at peak lr."""
    cfg = TrainConfig(steps=6, warmup_steps=5, lr=LR, min_lr=MIN_LR, schedule="cosine")
    assert [lr_at(s, cfg) for s in range(6)] == [LR * k / 5 for k in range(1, 6)] + [MIN_LR]


def test_constant_schedule_never_decays():
    cfg = TrainConfig(steps=10, warmup_steps=3, lr=LR, min_lr=MIN_LR, schedule="constant")
    assert [lr_at(s, cfg) for s in range(3, 10)] == [LR] * 7
