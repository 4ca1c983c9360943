"""`megaqwen-convert from-deepspeed`: a checkpoint in DeepSpeed's own format (as the DeepSpeed engine
wrote before both engines wrote DCP) becomes DCP that the native engine resumes with the next step
the DeepSpeed run took; and the resume contract's rules for such checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megaqwen.train import checkpoint as ckpt
from megaqwen.train import resume
from megaqwen.train.errors import UsageError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))
from test_launch import COMMON, ROOT, losses, shard, single_process  # noqa: E402,F401  (fixture)

STEPS = ("train.steps=3", "train.save_every=2")
# the DeepSpeed engine as it saved before: DeepSpeed's own files under a `deepspeed` tag
LEGACY_SAVER = """
import sys
import megaqwen.parallel.checkpoint as pc
pc.save = lambda path, model, optimizer, shards: model.save_checkpoint(path, tag=pc.LEGACY_DEEPSPEED_TAG)
from megaqwen.train.main import main
main()
"""


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
           f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)


@pytest.mark.distributed
@pytest.mark.slow
def test_legacy_deepspeed_checkpoint_converts_and_resumes_natively(tmp_path, shard):  # noqa: F811
    pytest.importorskip("deepspeed", reason="DeepSpeed not installed (pip install 'megaqwen[deepspeed]')")
    saver = tmp_path / "legacy_saver.py"
    saver.write_text(LEGACY_SAVER)
    src = tmp_path / "ds"
    run = torchrun(2, str(saver), "parallel.backend=gloo", f"train.out_dir={src}", f"data.path={shard}",
                   *COMMON, *STEPS, "train.engine=deepspeed", "parallel.zero_stage=2")
    assert run.returncode == 0, run.stderr[-4000:]
    step2 = src / "checkpoints" / "step_00000002"
    assert (step2 / "deepspeed").is_dir() and not (step2 / ".metadata").exists()
    ref = losses(src)  # the DeepSpeed run's step 3 from its in-memory state at step 2

    out = tmp_path / "converted"
    conv = torchrun(2, "-m", "megaqwen.convert.cli", "from-deepspeed", str(step2), "--out", str(out))
    assert conv.returncode == 0, conv.stderr[-4000:]
    new = out / "checkpoints" / "step_00000002"
    assert conv.stdout.strip().endswith(str(new))
    assert (out / "checkpoints" / "latest").read_text() == new.name
    meta = ckpt.read_meta(new)
    assert meta["step"] == 2 and meta["consumed_samples"] == json.loads((step2 / "meta.json").read_text())[
        "consumed_samples"]

    # the native engine in one process resumes it: the DeepSpeed run's next step
    import shutil

    shutil.copy(src / "metrics.jsonl", out / "metrics.jsonl")
    with pytest.raises(UsageError, match="train.engine"):  # an engine change is allowed explicitly
        single_process(out, shard, *STEPS)
    got = single_process(out, shard, *STEPS, "train.allow_changes=[train.engine,parallel]")
    assert got[2] == pytest.approx(ref[2], rel=1e-6)


def _legacy(tmp_path: Path, world_size: int = 2) -> tuple[Path, dict]:
    step = tmp_path / "checkpoints" / "step_00000004"
    (step / "deepspeed").mkdir(parents=True)
    meta = {"format": ckpt.FORMAT, "step": 4, "consumed_samples": 16,
            "resume": {resume.ENGINE_KEY: "deepspeed", "parallel.world_size": world_size, "parallel.tp": 1}}
    (step / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "checkpoints" / "latest").write_text(step.name)
    return step, meta


def test_legacy_format_is_refused_to_native_and_to_a_new_layout(tmp_path):
    step, meta = _legacy(tmp_path)
    with pytest.raises(UsageError) as e:
        resume.compare(step, meta, {resume.ENGINE_KEY: "native", "parallel.world_size": 2}, allowed=[])
    msg = str(e.value)
    assert "DeepSpeed's own checkpoint format" in msg and "\n" not in msg
    assert f"torchrun --nproc-per-node 2 -m megaqwen.convert.cli from-deepspeed {step}" in msg
    with pytest.raises(UsageError, match=r"does not reshard \(parallel.tp changed\).*from-deepspeed"):
        resume.compare(step, meta, {resume.ENGINE_KEY: "deepspeed", "parallel.world_size": 2,
                                    "parallel.tp": 2}, allowed=["parallel"])
    # the same layout in the DeepSpeed engine still reads it
    assert resume.compare(step, meta, {resume.ENGINE_KEY: "deepspeed", "parallel.world_size": 2,
                                       "parallel.tp": 1}, allowed=[]) == {}


def test_dcp_checkpoint_changes_engine_when_allowed(tmp_path):
    step = tmp_path / "step_00000004"
    step.mkdir()
    (step / ".metadata").write_bytes(b"")
    meta = {"format": ckpt.FORMAT, "step": 4, "resume": {resume.ENGINE_KEY: "native", "parallel.tp": 2}}
    current = {resume.ENGINE_KEY: "deepspeed", "parallel.tp": 1, "parallel.zero_stage": 2}
    with pytest.raises(UsageError, match=r"train.engine\s+native\s+deepspeed"):
        resume.compare(step, meta, current, allowed=["parallel"])
    diffs = resume.compare(step, meta, current, allowed=["train.engine", "parallel"])
    assert diffs == {resume.ENGINE_KEY: ("native", "deepspeed"), "parallel.tp": (2, 1)}
    resume.check_allow_changes([resume.ENGINE_KEY], [resume.ENGINE_KEY])  # a contract key like any


def test_converter_errors_before_work(tmp_path, capsys):
    from megaqwen.convert.cli import main

    step, _ = _legacy(tmp_path / "run", world_size=4)
    assert main(["from-deepspeed", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "saved by 4 process(es)" in err and "torchrun --nproc-per-node 4" in err
    assert not (tmp_path / "out").exists()
    dcp = tmp_path / "dcp" / "step_00000001"
    dcp.mkdir(parents=True)
    (dcp / ".metadata").write_bytes(b"")
    (dcp / "meta.json").write_text(json.dumps({"format": ckpt.FORMAT, "step": 1}))
    assert main(["from-deepspeed", str(dcp), "--out", str(tmp_path / "out")]) == 2
    assert "already DCP, which both engines resume" in capsys.readouterr().err
