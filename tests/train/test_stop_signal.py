"""SIGTERM / SIGUSR1 (SLURM pre-emption) and SIGINT (Ctrl-C) end a run cleanly: the step in flight
finishes, a checkpoint is saved, the process exits 0 within a bound, and rerunning the command
continues the loss curve of an uninterrupted run exactly. A second Ctrl-C stops at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megaqwen.train import checkpoint as ckpt
from megaqwen.train.loop import train
from megaqwen.train.reliability import StopSignal

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["model.vocab_size=512", "train.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=2",
          "train.steps=30", "train.save_every=0", "train.warmup_steps=2", "logger.wandb.enabled=false",
          "data.document_mask=false", "data.reset_position_ids=false"]


def _losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
# SIGINT (Ctrl-C) takes the same handler: tests/parallel/test_launch_sigint.py sends it through torchrun
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=lambda s: s.name)
def test_signal_saves_exits_zero_and_rerun_continues_exactly(tmp_path, shard, make_config, sig):
    straight = tmp_path / "straight"
    train(make_config(straight, shard, *COMMON[1:]))
    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "megaqwen.train.main", f"train.out_dir={out}", f"data.path={shard}", *COMMON]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 3) and time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    sent = time.time()
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    assert time.time() - sent < 60  # one step and one checkpoint, not the rest of the run
    assert f"{signal.Signals(sig).name} received" in output
    stopped_at = len(_losses(out))
    assert 3 <= stopped_at < 30
    assert ckpt.latest_checkpoint(out / "checkpoints").name == f"step_{stopped_at:08d}"
    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _losses(out) == _losses(straight)  # bit-identical curve, step for step


def test_second_ctrl_c_stops_at_once_and_a_forwarded_copy_does_not(monkeypatch):
    before = signal.getsignal(signal.SIGINT)
    stop = StopSignal(torch.device("cpu"))
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: a flag, no KeyboardInterrupt
        assert stop.agreed() == "SIGINT"
        os.kill(os.getpid(), signal.SIGINT)  # torchrun's forwarded copy, a moment later: ignored
        assert stop.agreed() == "SIGINT"
        monkeypatch.setattr(StopSignal, "REPEAT_S", 0.0)  # as if the second came seconds later
        with pytest.raises(KeyboardInterrupt, match="second SIGINT while stopping after SIGINT"):
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is before  # a third Ctrl-C gets Python's default
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGINT) is before


def test_ctrl_c_after_sigterm_stops_at_once_and_repeated_sigterm_does_not(monkeypatch):
    monkeypatch.setattr(StopSignal, "REPEAT_S", 0.0)
    stop = StopSignal(torch.device("cpu"))
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # SLURM may repeat it: still a clean stop
        assert stop.agreed() == "SIGTERM"
        with pytest.raises(KeyboardInterrupt, match="after SIGTERM"):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.close()
