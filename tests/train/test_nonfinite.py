"""A NaN injected at a chosen step triggers each `train.on_nonfinite` policy; loss spikes are flagged;
checkpoint retention keeps the last K and every M-th."""

from __future__ import annotations

import json
import math

import pytest

from megaqwen.train.loop import train
from megaqwen.train.reliability import LossHealth


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_stop_names_the_step_and_leaves_the_weights(tmp_path, shard, make_config):
    msg = "gradient norm is nan at step 2: the weights were not updated"
    with pytest.raises(FloatingPointError, match=msg):
        train(make_config(tmp_path, shard, "train.inject_nan_at_step=2", "train.save_every=0"))


def test_skip_drops_one_update_and_rollback_equals_it(tmp_path, shard, make_config):
    clean = tmp_path / "clean"
    train(make_config(clean, shard, "train.save_every=2"))
    runs = {}
    for policy in ("skip", "rollback"):
        out = tmp_path / policy
        train(make_config(out, shard, "train.save_every=2", "train.inject_nan_at_step=3",
                          f"train.on_nonfinite={policy}"))
        runs[policy] = _rows(out)
    ref = _rows(clean)
    for rows in runs.values():
        assert [r["loss"] for r in rows[:2]] == [r["loss"] for r in ref[:2]]  # before the fault
        assert math.isnan(rows[2]["grad_norm"]) and rows[2]["skipped_steps"] == 1
        assert all(math.isfinite(r["loss"]) for r in rows[3:]) and len(rows) == len(ref)
        assert rows[3]["loss"] != ref[3]["loss"]  # step 3's update is missing
    assert runs["rollback"][2]["rolled_back_to"] == 2
    # rolling back to step 2's checkpoint restores exactly the state a dropped step 3 keeps
    assert [r["loss"] for r in runs["rollback"][3:]] == [r["loss"] for r in runs["skip"][3:]]


def test_rollback_without_a_checkpoint_is_an_error(tmp_path, shard, make_config):
    with pytest.raises(FloatingPointError, match="no checkpoint to roll back to"):
        train(make_config(tmp_path, shard, "train.save_every=0", "train.inject_nan_at_step=1",
                          "train.on_nonfinite=rollback"))


def test_loss_spike_flagged_against_the_recent_mean():
    h = LossHealth(spike_factor=2.0)
    assert all("loss_spike" not in h.good_step(i, 1.0 + 0.01 * i) for i in range(6))
    assert h.good_step(7, 5.0)["loss_spike"] == 1.0
    assert "loss_spike" not in LossHealth(0.0).good_step(1, 1e9)


def test_retention_keeps_the_last_k_and_every_mth(tmp_path):
    from megaqwen.train.checkpoint import _prune

    for step in range(1, 13):
        (tmp_path / f"step_{step:08d}").mkdir()
    (tmp_path / "step_00000013.partial").mkdir()
    _prune(tmp_path, keep_last=2, keep_every=5)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["step_00000005", "step_00000010", "step_00000011", "step_00000012",
                    "step_00000013.partial"]
