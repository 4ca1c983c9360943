"""The trainer with context parallelism and with MoE expert parallelism, through launch/torchrun.sh,
against one process (packed documents, token-weighted loss, the aux-free routing bias on)."""

from __future__ import annotations

import json

import pytest

from .test_launch import MODEL_BUILT, check_hf_export, launch, losses, shard, single_process  # noqa: F401  (fixture)

pytestmark = pytest.mark.distributed


def _rows(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _against_one_process(tmp_path, data: str, common: tuple, name: str, *layout: str, nproc: int = 2):
    """Train `common` in one process and under `layout`; assert equal losses; (out, rows, ref rows, run)."""
    ref = single_process(tmp_path / "single", data, *common)
    out = tmp_path / name
    run = launch(out, data, *common, *layout, nproc=nproc)
    assert run.returncode == 0, run.stderr[-4000:]
    assert losses(out) == pytest.approx(ref, rel=1e-5)
    return out, _rows(out), _rows(tmp_path / "single"), run


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ring", "alltoall"])
def test_torchrun_cp2_equals_one_process(tmp_path, shard, mode):  # noqa: F811
    """cp=2 on packed documents: each rank runs its zig-zag half of every sequence; the losses and
    the validation loss equal one process."""
    evals = ("train.eval_every=4", "train.eval_iters=1", f"data.valid_path={shard}")
    _, rows, ref_rows, _ = _against_one_process(tmp_path, shard, evals, mode, "parallel.cp=2",
                                                f"parallel.cp_mode={mode}", "parallel.cp_tile=4")
    assert rows[-1]["val_loss"] == pytest.approx(ref_rows[-1]["val_loss"], rel=1e-5)


@pytest.mark.slow
def test_torchrun_moe_ep2_equals_one_process(tmp_path, shard):  # noqa: F811
    """debug-moe at ep=2 (dp=2: each rank holds half the experts, tokens all-to-all'd) with z-loss
    and the aux-free routing bias: losses, load metrics and the heat map as one process."""
    moe = ("model=debug-moe", "model.router_z_loss_coef=0.001", "model.moe_routing_bias_update_rate=0.01")
    out, rows, ref_rows, run = _against_one_process(tmp_path, shard, moe, "ep2", "parallel.ep=2")
    for got, want in zip(rows, ref_rows):
        assert got["moe/load_max"] == pytest.approx(want["moe/load_max"], rel=1e-6)
        assert got["z_loss"] == pytest.approx(want["z_loss"], rel=1e-5)
    assert (out / "expert_load.png").stat().st_size > 0
    # to-hf straight from the ep=2 checkpoint (stock transformers ignores the routing bias this run
    # trained, so the export is checked by reading it back)
    check_hf_export(out, tmp_path / "hf", ref=tmp_path / "single", transformers=False)
    assert "active per token" in run.stdout + run.stderr


def test_expert_and_context_layouts_that_do_not_fit_fail_before_work(tmp_path, shard):  # noqa: F811
    out = tmp_path / "bad"
    run = launch(out, shard, "model=debug-moe", "parallel.ep=2", "train.engine=deepspeed")
    assert run.returncode != 0 and "use train.engine=native with parallel.dp_mode=zero1 or fsdp" in run.stderr
    run = launch(out, shard, "parallel.cp=2", "train.seq_len=18")
    assert run.returncode != 0 and "seq_len=18 is not divisible by 2*cp=4" in run.stderr
    assert MODEL_BUILT not in run.stdout + run.stderr


@pytest.mark.slow
def test_torchrun_pp2_cp2_packed_documents_equals_one_process(tmp_path, shard):  # noqa: F811
    """Pipeline stages each running their zig-zag sequence shard (ring attention with the packed
    documents' masks across shards): losses as one process."""
    _against_one_process(tmp_path, shard, ("model.num_layers=4",), "pp2cp2", "parallel.pp=2", "parallel.cp=2",
                         "parallel.cp_tile=4", nproc=4)


@pytest.mark.slow
def test_torchrun_moe_pp2_equals_one_process(tmp_path, shard):  # noqa: F811
    """debug-moe in two pipeline stages with the router z-loss (each stage adds its layers' share)
    and aux-loss-free balancing (each stage updates its own routers' bias): as one process."""
    moe = ("model=debug-moe", "model.router_aux_loss_coef=0", "model.router_z_loss_coef=0.01",
           "model.moe_routing_bias_update_rate=0.01")
    _, rows, ref_rows, _ = _against_one_process(tmp_path, shard, moe, "pp2", "parallel.pp=2")
    assert [r["z_loss"] for r in rows] == pytest.approx([r["z_loss"] for r in ref_rows], rel=1e-5)
