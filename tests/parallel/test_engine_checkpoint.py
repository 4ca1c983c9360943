"""Checkpoints across layouts and engines, through the real trainer (launch/torchrun.sh, gloo):
one run saves at step 2 and goes on to step 3; others resume its step-2 checkpoint under another
layout or engine. Every resumer's step-3 loss equals the saver's, and its step-3 checkpoint (the
weights and Adam moments after one more update from the loaded state) equals the saver's."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from .test_launch import launch, losses, shard, single_process  # noqa: F401  (fixture)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
STEPS = ("train.steps=3", "train.save_every=2", "model.num_layers=4")
RESUME = "train.allow_changes=[train.engine,parallel]"


def full_checkpoint(step_dir: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """A DCP checkpoint as one flat dict of full tensors (and hyper-parameters), in one process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{step_dir.parent.parent.name}-{step_dir.name}.pt"
    dcp_to_torch_save(step_dir, out)
    sd = torch.load(out, weights_only=False)
    return {f"{part}/{k}": v for part in ("model", "optim") for k, v in sd[part].items()}


def resume_from(src: Path, dst: Path, step: str = "step_00000002") -> Path:
    """A new run folder holding `src`'s step-2 checkpoint as its latest (and its metrics so far)."""
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / step, dst / "checkpoints" / step)
    (dst / "checkpoints" / "latest").write_text(step)
    shutil.copy(src / "metrics.jsonl", dst / "metrics.jsonl")
    return dst


def assert_same_checkpoint(got: dict, ref: dict, rel: float) -> None:
    """Same keys; the same weights, moments and step; the same hyper-parameters (the flags that
    name an implementation, e.g. foreach, may differ between engines)."""
    model_optim = [k for k in ref if k.startswith("model/") or ".exp_avg" in k or k.endswith(".step")]
    missing = [k for k in model_optim if k not in got]
    assert not missing, missing[:5]
    for k in model_optim:
        assert got[k].shape == ref[k].shape, k
        torch.testing.assert_close(got[k].float(), ref[k].float(), rtol=rel, atol=rel * 1e-3, msg=k)
    for k in ref:
        if k.rsplit(".", 1)[-1] in ("lr", "betas", "eps", "weight_decay") and k in got:
            assert got[k] == pytest.approx(ref[k]), k


def test_native_tp2_pp2_resumes_in_one_process_fsdp_and_deepspeed(tmp_path, shard):  # noqa: F811
    """Saved at tp=2 x pp=2 (SP, tied embeddings): resumed in one process, at dp=4 FSDP2 and in the
    DeepSpeed engine (ZeRO-2, tp=2 x dp=2): the same next-step loss and the same state after it."""
    pytest.importorskip("deepspeed", reason="DeepSpeed not installed (pip install 'megaqwen[deepspeed]')")
    src = tmp_path / "pp2tp2"
    run = launch(src, shard, *STEPS, "parallel.pp=2", "parallel.tp=2", "parallel.sequence_parallel=true",
                 nproc=4)
    assert run.returncode == 0, run.stderr[-4000:]
    ref = losses(src)
    ref_state = full_checkpoint(src / "checkpoints" / "step_00000003", tmp_path)
    assert ref_state["optim/state.model.layers.0.mlp.down_proj.weight.step"] == 3

    one = resume_from(src, tmp_path / "one")
    assert single_process(one, shard, *STEPS, RESUME)[2] == pytest.approx(ref[2], rel=1e-6)
    for name, extra in [("fsdp4", ("parallel.dp_mode=fsdp",)),
                        ("ds_zero2", ("train.engine=deepspeed", "parallel.zero_stage=2", "parallel.tp=2"))]:
        out = resume_from(src, tmp_path / name)
        run = launch(out, shard, *STEPS, *extra, RESUME, nproc=4)
        assert run.returncode == 0, run.stderr[-4000:]
        assert losses(out)[2] == pytest.approx(ref[2], rel=1e-6), name
        got = full_checkpoint(out / "checkpoints" / "step_00000003", tmp_path)
        assert_same_checkpoint(got, ref_state, rel=1e-5)


def test_deepspeed_checkpoint_resumes_native_and_in_zero3(tmp_path, shard):  # noqa: F811
    """Saved by the DeepSpeed engine (ZeRO-1, dp=2): DCP with the native keys; resumed by the
    native engine in one process and by DeepSpeed ZeRO-3 at dp=2, with the same next step."""
    pytest.importorskip("deepspeed", reason="DeepSpeed not installed (pip install 'megaqwen[deepspeed]')")
    src = tmp_path / "ds1"
    run = launch(src, shard, *STEPS, "train.engine=deepspeed", "parallel.zero_stage=1")
    assert run.returncode == 0, run.stderr[-4000:]
    ref = losses(src)
    saved = src / "checkpoints" / "step_00000002"
    assert (saved / ".metadata").is_file() and not (saved / "deepspeed").exists()
    ref_state = full_checkpoint(src / "checkpoints" / "step_00000003", tmp_path)

    one = resume_from(src, tmp_path / "one")
    assert single_process(one, shard, *STEPS, RESUME)[2] == pytest.approx(ref[2], rel=1e-6)
    assert_same_checkpoint(full_checkpoint(one / "checkpoints" / "step_00000003", tmp_path), ref_state,
                           rel=1e-5)
    z3 = resume_from(src, tmp_path / "z3")
    run = launch(z3, shard, *STEPS, "train.engine=deepspeed", "parallel.zero_stage=3", RESUME)
    assert run.returncode == 0, run.stderr[-4000:]
    assert losses(z3)[2] == pytest.approx(ref[2], rel=1e-6)
    assert_same_checkpoint(full_checkpoint(z3 / "checkpoints" / "step_00000003", tmp_path), ref_state,
                           rel=1e-5)
