"""Asynchronous checkpoints (train.async_save): the state is snapshotted when `save` returns, the
checkpoint becomes `latest` only once written, a failed write leaves the previous one in charge,
and the trainer's losses and checkpoints are the same as with synchronous saves."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from torch.distributed.checkpoint import FileSystemWriter

from megaqwen.models.config import get_config
from megaqwen.models.qwen2 import build_model
from megaqwen.train import checkpoint as ckpt
from megaqwen.train.loop import train


def _model_and_opt(seed: int):
    torch.manual_seed(seed)
    model = build_model(get_config("debug", vocab_size=256, num_layers=2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 256, (2, 16))
    model(tokens, tokens).mean().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


@pytest.fixture
def gated_writer(monkeypatch):
    """FileSystemWriter.write_data waits for the returned event, or raises what it holds."""
    gate, failure = threading.Event(), {}
    original = FileSystemWriter.write_data

    def write_data(self, plan, planner):
        assert gate.wait(60), "the test never opened the gate"
        if "error" in failure:
            raise failure["error"]
        return original(self, plan, planner)

    monkeypatch.setattr(FileSystemWriter, "write_data", write_data)
    return gate, failure


def test_async_save_snapshots_state_and_commits_when_written(tmp_path, gated_writer):
    gate, _ = gated_writer
    model, opt = _model_and_opt(0)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {n: opt.state[p]["exp_avg"].clone() for n, p in model.named_parameters()}
    saver = ckpt.Checkpointer(tmp_path / "checkpoints", async_save=True)
    out = saver.save(1, model, opt, {"consumed_samples": 2})
    assert out["checkpoint_blocking_s"] > 0 and "checkpoint_save_s" not in out
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints") is None  # nothing committed while writing
    with torch.no_grad():  # training goes on and changes the weights and moments in place
        for p in model.parameters():
            p.add_(1.0)
            opt.state[p]["exp_avg"].mul_(0)
    assert saver.poll() == {}
    gate.set()
    done = saver.wait()
    assert done["checkpoint_step"] == 1 and done["checkpoint_save_s"] >= out["checkpoint_blocking_s"]
    latest = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    assert latest.name == "step_00000001" and ckpt.read_meta(latest)["consumed_samples"] == 2
    fresh, fresh_opt = _model_and_opt(1)
    ckpt.load_checkpoint(latest, fresh, fresh_opt)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, saved[k]), k  # the state as it was when save() returned
    for n, p in fresh.named_parameters():
        assert torch.equal(fresh_opt.state[p]["exp_avg"], moments[n]), n


def test_failed_background_write_keeps_the_previous_checkpoint(tmp_path, gated_writer):
    gate, failure = gated_writer
    gate.set()
    model, opt = _model_and_opt(0)
    saver = ckpt.Checkpointer(tmp_path / "checkpoints", async_save=True, keep_last=2)
    saver.save(1, model, opt, {"consumed_samples": 2})
    saver.wait()
    failure["error"] = OSError(28, "No space left on device")
    saver.save(2, model, opt, {"consumed_samples": 4})
    with pytest.raises(RuntimeError, match=r"asynchronous checkpoint of step 2 failed on rank 0: .*"
                                           r"No space left on device.*still names the previous"):
        saver.wait()
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints").name == "step_00000001"
    # the next save clears the failed one's partial folder and commits normally
    failure.clear()
    saver.save(3, model, opt, {"consumed_samples": 6})
    saver.wait()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_00000001", "step_00000003"]


def test_trainer_async_save_equals_sync(tmp_path, shard, make_config):
    rows = {}
    for mode in ("false", "true"):
        out = tmp_path / mode
        train(make_config(out, shard, f"train.async_save={mode}", "train.save_every=2"))
        rows[mode] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows["true"]] == [r["loss"] for r in rows["false"]]
    # each save's metrics ride on the row after it (the last save's are in the log only)
    saves = [r for r in rows["true"] if "checkpoint_blocking_s" in r]
    assert [r["step"] for r in saves] == [3, 5]
    commits = [(r["step"], r["checkpoint_step"]) for r in rows["true"] if "checkpoint_step" in r]
    assert commits and all(seen > step and step in (2, 4) for seen, step in commits)
    assert ckpt.latest_checkpoint(tmp_path / "true" / "checkpoints").name == "step_00000006"
    a, b = (ckpt.latest_checkpoint(tmp_path / m / "checkpoints") for m in ("false", "true"))
    assert ckpt.read_meta(a)["consumed_samples"] == ckpt.read_meta(b)["consumed_samples"]
