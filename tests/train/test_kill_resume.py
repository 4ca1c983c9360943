"""SIGKILL of a 4-process run (tp=2 x dp=2) while an asynchronous checkpoint is being written: the
run went on training during the write, the killed write never became `latest`, and rerunning the
same command resumes from the previous complete checkpoint with a loss curve equal to the
uninterrupted run's, step for step, bit for bit (fp32)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megaqwen.train import checkpoint as ckpt

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]
RUN = ["model.vocab_size=512", "train.seq_len=16", "train.global_batch_size=4", "train.micro_batch_size=1",
       "train.steps=6", "train.save_every=2", "train.warmup_steps=1", "train.lr=3e-3",
       "logger.wandb.enabled=false", "parallel.tp=2", "train.async_save=true"]
STALL = "step_00000004"
# the trainer with the DCP file writer stalled for the step-4 checkpoint: the write is in flight,
# for as long as the test needs, while training goes on
DRIVER = f"""#!{sys.executable}
import os, time
from torch.distributed.checkpoint import FileSystemWriter

_write = FileSystemWriter.write_data

def write_data(self, plan, planner):
    if "{STALL}" in str(self.path):
        time.sleep(3600)
    return _write(self, plan, planner)

FileSystemWriter.write_data = write_data
from megaqwen.train.main import main
main()
"""


def _launch(out: Path, shard: str, trainer: Path | None = None, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    if trainer is not None:
        env["TRAIN"] = str(trainer)  # launch/torchrun.sh runs this instead of megaqwen-train
    cmd = ["bash", str(ROOT / "launch/torchrun.sh"), "--nproc-per-node", "4", f"train.out_dir={out}",
           f"data.path={shard}", *RUN]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)


def _rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _descendants(pid: int) -> list[int]:
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


@pytest.mark.slow
def test_sigkill_during_async_save_resumes_bit_identical(tmp_path, shard):
    straight = tmp_path / "straight"
    ref = _launch(straight, shard)
    assert ref.wait(timeout=600) == 0, ref.stdout.read()[-4000:]
    want = [r["loss"] for r in _rows(straight)]
    assert len(want) == 6

    driver = tmp_path / "stalling-trainer"
    driver.write_text(DRIVER)
    driver.chmod(0o755)
    out = tmp_path / "killed"
    proc = _launch(out, shard, trainer=driver, start_new_session=True)
    try:
        partial = out / "checkpoints" / f"{STALL}.partial"
        deadline = time.time() + 600
        # step 5 logged and the step-4 folder begun: that write is in flight, stalled
        while (len(_rows(out)) < 5 or not partial.is_dir()) and time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            time.sleep(0.2)
        assert len(_rows(out)) >= 5
        # training went on while step 4's checkpoint was being written
        assert partial.is_dir()
        assert ckpt.latest_checkpoint(out / "checkpoints").name == "step_00000002"
    finally:
        for pid in [*_descendants(proc.pid), proc.pid]:  # every rank, whatever session torchrun gave it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed_output = proc.communicate(timeout=60)[0]
    assert proc.returncode == -signal.SIGKILL, killed_output[-4000:]
    before = _rows(out)

    rerun = _launch(out, shard)  # the same command, as a requeued job would run it
    output = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, output[-4000:]
    assert "resumed from" in output and "step_00000002" in output, output[-4000:]
    rows = _rows(out)  # the resume drops the rows logged after its checkpoint, then appends
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows] == want  # bit-identical curve, step for step
    assert [r["loss"] for r in before] == want[:len(before)]  # the killed attempt agreed too
    assert ckpt.latest_checkpoint(out / "checkpoints").name == "step_00000006"
    assert not list((out / "checkpoints").glob("*.partial"))  # the killed write was cleared
