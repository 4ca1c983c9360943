"""launch/slurm/train.sbatch: the dry run's per-node commands, and shellcheck over launch/."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "launch/slurm/train.sbatch"
OVERRIDES = ["model=qwen2.5-7b", "train.out_dir=runs/my run", "data.name=it's \"quoted\"", "parallel.tp=8"]


def _dry_run(overrides, **env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MEGAQWEN_"))}
    for k in ("GPUS_PER_NODE", "OMP_NUM_THREADS", "MASTER_PORT", "NCCL_SOCKET_IFNAME"):
        clean.pop(k, None)
    clean["PATH"] = "/usr/bin:/bin"  # no scontrol: the script's own node-list expander runs
    r = subprocess.run(["bash", str(SBATCH), *overrides], env={**clean, **env}, capture_output=True,
                       text=True, timeout=60)
    return r


def test_dry_run_two_nodes_eight_gpus():
    r = _dry_run(OVERRIDES, MEGAQWEN_DRY_RUN="1", SLURM_JOB_NODELIST="gpu-[007-008]", SLURM_NNODES="2",
                 SLURM_GPUS_ON_NODE="8", SLURM_JOB_ID="4242", SLURM_CPUS_ON_NODE="96",
                 PYTHON=sys.executable)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    check = next(x for x in lines if x.startswith("check:"))
    assert check.split()[1] == "WORLD_SIZE=16"
    assert shlex.split(check)[-len(OVERRIDES):] == OVERRIDES
    srun = shlex.split(next(x for x in lines if x.startswith("srun:")).removeprefix("srun:"))
    assert srun[0] == "srun" and "--ntasks-per-node=1" in srun and "--nodes=2" in srun
    assert any(a.startswith("--output=") and a.endswith("-4242-node%n.log") for a in srun)
    assert srun[-len(OVERRIDES):] == OVERRIDES
    nodes = [x for x in lines if x.startswith("node ")]
    assert [x.split(":", 1)[0] for x in nodes] == ["node 0 (gpu-007)", "node 1 (gpu-008)"]
    for line in nodes:
        argv = shlex.split(line.split(":", 1)[1])
        assert argv[0] == "OMP_NUM_THREADS=12"  # 96 cores / 8 processes
        assert argv[1] == sys.executable and argv[2:4] == ["-m", "torch.distributed.run"]
        for want in ("--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d",
                     "--rdzv-endpoint=gpu-007:29500", "--rdzv-id=4242", "--no-python"):
            assert want in argv, (want, argv)
        trainer = argv.index("--no-python") + 1
        assert argv[trainer].endswith("megaqwen-train")
        assert argv[trainer + 1:] == ["parallel.backend=nccl", *OVERRIDES]


def test_dry_run_flag_gpu_count_forms_and_backend_override():
    r = _dry_run(["--dry-run", "parallel.backend=gloo"], SLURM_JOB_NODELIST="a1,b[2-4]",
                 SLURM_GPUS_ON_NODE="h100:4", MASTER_PORT="1234", PYTHON=sys.executable)
    assert r.returncode == 0, r.stderr
    nodes = [x for x in r.stdout.splitlines() if x.startswith("node ")]
    assert [x.split(":", 1)[0] for x in nodes] == ["node 0 (a1)", "node 1 (b2)", "node 2 (b3)", "node 3 (b4)"]
    argv = shlex.split(nodes[3].split(":", 1)[1])
    assert "--nnodes=4" in argv and "--nproc-per-node=4" in argv and "--rdzv-endpoint=a1:1234" in argv
    assert argv[-1] == "parallel.backend=gloo" and "parallel.backend=nccl" not in argv


@pytest.mark.parametrize("env, message", [
    ({}, "SLURM_JOB_NODELIST is not set"),
    ({"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NNODES": "3"}, "has 2 host(s)"),
])
def test_dry_run_errors_name_the_problem(env, message):
    r = _dry_run(["model=debug"], MEGAQWEN_DRY_RUN="1", GPUS_PER_NODE="8", PYTHON=sys.executable, **env)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_shellcheck_passes_on_launch():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck)")
    scripts = sorted((REPO / "launch").glob("**/*.sh")) + sorted((REPO / "launch").glob("**/*.sbatch"))
    assert len(scripts) >= 4
    r = subprocess.run(["shellcheck", "--shell=bash", *map(str, scripts)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
