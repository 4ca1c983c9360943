"""SLURM execution: array-index -> rank mapping and the submission script, with a fake sbatch."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megaqwen.data_pipeline.pipeline_cli import _rank_world

ROOT = Path(__file__).resolve().parents[2]


def _args(rank="slurm", world=1):
    return argparse.Namespace(rank=rank, world=world)


def test_slurm_rank_is_the_array_index(monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MAX", "63")
    assert _rank_world(_args()) == (5, 64)
    # a sparse resubmission of failed tasks keeps each task's original share via --world
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MAX", "7")
    assert _rank_world(_args(world=64)) == (7, 64)
    with pytest.raises(ValueError, match="SLURM_ARRAY_TASK_ID=7 is outside a world of 4"):
        _rank_world(_args(world=4))
    assert _rank_world(_args(rank="2", world=8)) == (2, 8)


def test_slurm_rank_outside_an_array_job_is_named(monkeypatch):
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    with pytest.raises(ValueError, match="--rank slurm needs SLURM_ARRAY_TASK_ID"):
        _rank_world(_args())


def test_submission_script_chains_stages_with_a_fake_sbatch(tmp_path):
    log = tmp_path / "sbatch.log"
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text(f'#!/usr/bin/env bash\necho "$@" >> {log}\necho $((1000 + $(wc -l < {log})))\n')
    fake.chmod(0o755)
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{fake.parent}:{bindir}:{os.environ['PATH']}",
           "LOG_DIR": str(tmp_path / "logs")}
    out = subprocess.run(["bash", str(ROOT / "launch/slurm_data_pipeline.sh"),
                          str(ROOT / "data_pipeline/configs/pipeline_sample.yaml"), "8"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    calls = log.read_text().splitlines()
    assert calls, "no job submitted"
    first = calls[0]
    assert "--array=0-7" in first and "--stage filter" in first and "--rank slurm --world 8" in first
    for k, call in enumerate(calls[1:]):  # each stage waits for the job id sbatch gave the one before
        assert f"--dependency=afterok:{1001 + k}" in call
    assert any("--stage report" in c and "--array=0-0" in c for c in calls)
