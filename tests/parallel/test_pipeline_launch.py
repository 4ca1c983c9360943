"""The trainer under pipeline parallelism, through launch/torchrun.sh: losses, resharding resumes and
start-up errors, compared with one process."""

from __future__ import annotations

import json

import pytest

from .test_launch import MODEL_BUILT, check_hf_export, launch, losses, shard, single_process  # noqa: F401  (fixture)

pytestmark = pytest.mark.distributed
LAYERS = "model.num_layers=4"


@pytest.mark.slow
def test_pp2_tp2_saves_and_resumes_at_pp1_and_pp4(tmp_path, shard):  # noqa: F811
    """pp=2 x tp=2 + SP (1F1B, tied embeddings) trains like one process, with validation; its step-2
    checkpoint resumes under pp=1 (one process) and pp=4 (1F1B over 4 ranks) with the same losses."""
    evals = ("train.eval_every=2", "train.eval_iters=2", f"data.valid_path={shard}")
    ref = single_process(tmp_path / "single", shard, LAYERS, *evals)
    ref_rows = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    out = tmp_path / "pp2tp2"
    first = launch(out, shard, LAYERS, "parallel.pp=2", "parallel.tp=2", "parallel.sequence_parallel=true",
                   "train.exit_at_step=2", *evals, nproc=4)
    assert first.returncode == 0, first.stderr[-4000:]
    assert losses(out) == pytest.approx(ref[:2], rel=1e-5)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    from megaqwen.train.metric_names import unregistered

    assert unregistered({k for r in rows for k in r}) == []  # pipeline and straggler keys are documented
    assert all(0 < r["pp_bubble_theory"] < 1 and r["pp_rank1_peak_mem_gib"] > 0 for r in rows)
    # straggler report: every rank's step time gathered, the slowest named
    assert all(0 <= r["slowest_rank"] < 4 and r["step_time_max_s"] >= r["step_time_min_s"] for r in rows)
    # validation runs the stages forward only; same held-out loss as one process
    assert rows[-1]["val_loss"] == pytest.approx(ref_rows[1]["val_loss"], rel=1e-5)
    # to-hf straight from the pp=2 x tp=2 checkpoint
    check_hf_export(out, tmp_path / "hf", ref=tmp_path / "single" / "checkpoints" / "step_00000002")
    for name, nproc, extra in [("pp1", 1, ()), ("pp4", 4, ("parallel.pp=4",))]:
        resumed = tmp_path / name
        resumed.mkdir()
        # the same run folder contents up to step 2, resumed under another layout
        import shutil

        shutil.copytree(out / "checkpoints", resumed / "checkpoints")
        shutil.copy(out / "metrics.jsonl", resumed / "metrics.jsonl")
        for f in out.glob("run*.json"):
            shutil.copy(f, resumed / f.name)
        if nproc == 1:
            got = single_process(resumed, shard, LAYERS, *evals, "train.allow_changes=[parallel]")
        else:
            run = launch(resumed, shard, LAYERS, *extra, *evals, "train.allow_changes=[parallel]",
                         nproc=nproc)
            assert run.returncode == 0, run.stderr[-4000:]
            got = losses(resumed)
        assert got[-2:] == pytest.approx(ref[2:], rel=1e-5), name


def test_pipeline_layout_errors_before_work(tmp_path, shard):  # noqa: F811
    out = tmp_path / "bad"
    run = launch(out, shard, "model.num_layers=3", "parallel.pp=2")
    assert run.returncode != 0
    assert "num_layers=3 is not divisible by pp*virtual stages = 2*1" in run.stderr
    assert "parallel.pp_layers=" in run.stderr  # the message proposes an explicit split
    assert MODEL_BUILT not in run.stdout + run.stderr
    run = launch(out, shard, LAYERS, "parallel.pp=2", "parallel.pp_schedule=dualpipev",
                 "train.global_batch_size=2")
    assert run.returncode != 0
    assert "needs at least 4 micro-batches per step, got 2" in run.stderr
    assert MODEL_BUILT not in run.stdout + run.stderr
    assert not (out / "metrics.jsonl").exists()
