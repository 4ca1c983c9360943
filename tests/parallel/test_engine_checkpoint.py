"""Checkpoints across layouts and engines, through the real trainer (launch/torchrun.sh, gloo):
one run (tp=2 x pp=2) saves every step; others resume its step-2 checkpoint under another layout
or engine for one step. Every resumer's step-3 loss equals the saver's, and so does its step-3
checkpoint: the weights, Adam moments and step after one update from the loaded state (a moment
loaded wrong would show there)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from .test_launch import launch, losses, shard, single_process  # noqa: F401  (fixture)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
LAYERS = ("model.num_layers=4", "train.steps=4")  # the LR schedule spans train.steps: keep it
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


# k_proj.bias has no gradient but roundoff (softmax ignores what every key score of a query shares),
# and Adam turns that noise into a full-size step whose sign differs between layouts
NOISE = (".k_proj.bias",)


def assert_same_checkpoint(got: dict, ref: dict, rel: float) -> None:
    """Same keys; the same weights, Adam moments and step (max error over the tensor's max <= rel);
    the same hyper-parameters (not the flags that name an implementation, e.g. foreach, which may
    differ between engines)."""
    keys = [k for k in ref if k.startswith(("model/", "optim/state."))]
    missing = [k for k in keys if k not in got]
    assert not missing, missing[:5]
    for k in keys:
        assert got[k].shape == ref[k].shape, k
        if k.startswith("model/") and k.endswith(NOISE):
            continue
        err = (got[k].float() - ref[k].float()).abs().max() / ref[k].float().abs().max().clamp(min=1e-30)
        assert err <= rel, (k, err.item())  # relative to the tensor's largest element
    for k in ref:
        if k.rsplit(".", 1)[-1] in ("lr", "betas", "eps", "weight_decay") and k in got:
            assert got[k] == pytest.approx(ref[k]), k


@pytest.fixture(scope="module")
def saved(tmp_path_factory, shard):  # noqa: F811
    """The saver: tp=2 x pp=2 + SP (1F1B, tied embeddings across the stages), 4 steps, a
    checkpoint after each. Returns its folder, losses and step-3 checkpoint."""
    src = tmp_path_factory.mktemp("pp2tp2") / "run"
    run = launch(src, shard, *LAYERS, "train.save_every=1", "parallel.pp=2", "parallel.tp=2",
                 "parallel.sequence_parallel=true", nproc=4)
    assert run.returncode == 0, run.stderr[-4000:]
    state = full_checkpoint(src / "checkpoints" / "step_00000003", src.parent)
    assert state["optim/state.model.layers.0.mlp.down_proj.weight.step"] == 3
    return src, losses(src), state


def resumed(saved, tmp_path, shard, name, *extra, nproc):  # noqa: F811
    """Resume the saver's step-2 checkpoint under `extra` for one step: (step-3 loss, checkpoint)."""
    out = resume_from(saved[0], tmp_path / name)
    if nproc == 1:
        single_process(out, shard, *LAYERS, "train.exit_at_step=3", *extra, RESUME)
    else:
        run = launch(out, shard, *LAYERS, "train.exit_at_step=3", *extra, RESUME, nproc=nproc)
        assert run.returncode == 0, run.stderr[-4000:]
    return losses(out)[2], full_checkpoint(out / "checkpoints" / "step_00000003", tmp_path)


def test_native_tp2_pp2_resumes_in_one_process_and_at_dp4_fsdp(saved, tmp_path, shard):  # noqa: F811
    _, ref, ref_state = saved
    for name, extra, nproc in [("one", (), 1), ("fsdp4", ("parallel.dp_mode=fsdp",), 4)]:
        loss, state = resumed(saved, tmp_path, shard, name, *extra, nproc=nproc)
        assert loss == pytest.approx(ref[2], rel=1e-6), name
        assert_same_checkpoint(state, ref_state, rel=1e-5)


def test_native_to_deepspeed_zero2_tp2_and_back(saved, tmp_path, shard):  # noqa: F811
    """The DeepSpeed engine (ZeRO-2, tp=2 x dp=2) resumes the native checkpoint; the native engine
    in one process resumes the DeepSpeed engine's next checkpoint: the saver's steps 3 and 4."""
    pytest.importorskip("deepspeed", reason="DeepSpeed not installed (pip install 'megaqwen[deepspeed]')")
    src, ref, ref_state = saved
    loss, state = resumed(saved, tmp_path, shard, "ds2", "train.engine=deepspeed", "parallel.zero_stage=2",
                          "parallel.tp=2", nproc=4)
    assert loss == pytest.approx(ref[2], rel=1e-6)
    assert_same_checkpoint(state, ref_state, rel=1e-5)
    back = resume_from(tmp_path / "ds2", tmp_path / "back", step="step_00000003")
    got = single_process(back, shard, *LAYERS, RESUME)
    assert got[3] == pytest.approx(ref[3], rel=1e-6)


def test_native_to_deepspeed_zero3(saved, tmp_path, shard):  # noqa: F811
    """ZeRO-3 (parameters partitioned over dp=2) resumes it: the same step 3 and the same state
    after it (weight decay included: ZeRO-3's 1-D partitioned parameters once all fell in the
    no-decay group)."""
    pytest.importorskip("deepspeed", reason="DeepSpeed not installed (pip install 'megaqwen[deepspeed]')")
    loss, state = resumed(saved, tmp_path, shard, "z3", "train.engine=deepspeed", "parallel.zero_stage=3",
                          nproc=2)
    assert loss == pytest.approx(saved[1][2], rel=1e-6)
    assert_same_checkpoint(state, saved[2], rel=1e-5)


def test_deepspeed_zero3_starts_from_a_native_checkpoint(saved, tmp_path, shard):  # noqa: F811
    """train.init_from a native (tp=2 x pp=2) checkpoint under ZeRO-3: the weights are read into the
    engine's partitions after it is built, and the new run trains like one process started from the
    same weights."""
    pytest.importorskip("deepspeed", reason="DeepSpeed not installed (pip install 'megaqwen[deepspeed]')")
    init = (f"train.init_from={saved[0] / 'checkpoints' / 'step_00000002'}", "model.num_layers=4",
            "train.steps=2", "train.save_every=0")
    ref = single_process(tmp_path / "one", shard, *init)
    run = launch(tmp_path / "z3", shard, *init, "train.engine=deepspeed", "parallel.zero_stage=3")
    assert run.returncode == 0, run.stderr[-4000:]
    assert "this rank's ZeRO-3 partitions only" in run.stdout + run.stderr
    got = losses(tmp_path / "z3")
    assert got[0] == pytest.approx(ref[0], rel=1e-6)  # the same weights, partitioned
    assert got[1] == pytest.approx(ref[1], rel=1e-5)  # and a fresh optimizer's first update
