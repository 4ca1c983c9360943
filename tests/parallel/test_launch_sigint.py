"""Ctrl-C under `launch/torchrun.sh`: the ranks finish their step, save a checkpoint and exit 0, and
so does the launcher (stock torchrun ends with a SignalException traceback and status 1); the rerun
continues from that checkpoint with the losses of a run never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from megaqwen.data.indexed import IndexedDatasetBuilder
from megaqwen.train.torchrun import child_pids

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
RUN = ["model.vocab_size=512", "train.seq_len=16", "train.global_batch_size=4", "train.micro_batch_size=1",
       "train.save_every=1000", "train.warmup_steps=1", "train.lr=3e-3", "logger.wandb.enabled=false",
       "train.fit_check=false"]


def _shard(tmp_path: Path) -> str:
    prefix = tmp_path / "docs"
    rng = np.random.default_rng(0)
    with IndexedDatasetBuilder(prefix) as b:
        for _ in range(100):
            b.add_document(rng.integers(4, 512, int(rng.integers(20, 200))).astype(np.int64))
    return str(prefix)


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def _launch(out: Path, shard: str, *extra: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = ["bash", str(ROOT / "launch/torchrun.sh"), "--nproc-per-node", "2", f"train.out_dir={out}",
           f"data.path={shard}", "train.steps=400", *RUN, *extra]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)


def test_child_pids_lists_direct_children_not_grandchildren():
    # a child that starts a grandchild and prints its pid (the test process may have other children)
    code = ("import subprocess, sys, time; g = subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(60)']); print(g.pid, flush=True); time.sleep(60)")
    kid = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(kid.stdout.readline())
        found = child_pids(os.getpid())
        assert kid.pid in found and grandchild not in found
        assert child_pids(kid.pid) == [grandchild]
    finally:
        os.kill(grandchild, signal.SIGKILL)
        kid.kill()
        kid.wait()


def test_ctrl_c_under_the_launcher_saves_exits_0_and_the_rerun_continues(tmp_path):
    shard = _shard(tmp_path)
    out, ref = tmp_path / "run", tmp_path / "ref"
    # a terminal's Ctrl-C: SIGINT to the launcher's whole process group (its own session here)
    proc = _launch(out, shard, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read()[-4000:]
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-4000:]
    assert "Traceback" not in log and "SignalException" not in log, log[-4000:]
    latest = (out / "checkpoints" / "latest").read_text().strip()
    stopped = int(latest.rsplit("_", 1)[1])
    assert 1 <= stopped < 400 and f"checkpoint saved at step {stopped}" in log, log[-4000:]
    # the same command again goes on (here for two steps); an uninterrupted run gives the same losses
    rerun = _launch(out, shard, f"train.exit_at_step={stopped + 2}")
    log2, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, log2[-4000:]
    straight = _launch(ref, shard, f"train.exit_at_step={stopped + 2}")
    log3, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, log3[-4000:]
    assert _losses(out) == _losses(ref)
