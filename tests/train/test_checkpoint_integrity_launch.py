"""Checksums under torchrun (tp=2, background saves): the ranks sum their share of the files after
the write, and on resume agree that a bit flip in rank 1's shard of the latest checkpoint rules it
out; the job falls back to the previous checkpoint and continues exactly as a job resumed from that
checkpoint directly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from megaqwen.train import checkpoint as ckpt

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
RUN = ["model.vocab_size=512", "train.seq_len=16", "train.global_batch_size=4", "train.micro_batch_size=2",
       "train.steps=6", "train.save_every=3", "train.warmup_steps=1", "logger.wandb.enabled=false",
       "parallel.tp=2", "train.async_save=true"]
SHARD = "__1_0.distcp"  # rank 1's half of the tp-sharded state


def _launch(out: Path, shard: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    cmd = ["bash", str(ROOT / "launch/torchrun.sh"), "--nproc-per-node", "2", f"train.out_dir={out}",
           f"data.path={shard}", *RUN]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output


def _losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_bit_flip_in_one_ranks_shard_falls_back_on_every_rank(tmp_path, shard):
    run, direct = tmp_path / "run", tmp_path / "direct"
    _launch(run, shard)
    bad = run / "checkpoints" / "step_00000006"
    files = ckpt.read_meta(bad)["files"]
    assert {"__0_0.distcp", SHARD, ".metadata"} <= set(files)
    shutil.copytree(run, direct)
    shutil.rmtree(direct / "checkpoints" / "step_00000006")
    (direct / "checkpoints" / "latest").write_text("step_00000003")
    _launch(direct, shard)

    data = bytearray((bad / SHARD).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bad / SHARD).write_bytes(bytes(data))
    output = _launch(run, shard)
    lines = [x for x in output.splitlines() if "fails its checks" in x]
    assert lines and all(f"checkpoint {bad} fails its checks: {SHARD} has CRC-32" in x for x in lines), output
    assert "resumed from" in output and "step_00000003" in output, output[-4000:]
    assert len(_losses(run)) == 6 and _losses(run) == _losses(direct)
    assert ckpt.latest_checkpoint(run / "checkpoints").name == "step_00000006"
    assert (run / "checkpoints" / "step_00000006.damaged").is_dir()
