"""A DCP checkpoint saved under a layout resumes under the same layout with identical losses, and
stores full tensors (a single process can load it, e.g. for HF export)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from parallel_harness import Layout, gather_full, global_batches, layout_config, spawn
from trainer_harness import build_run, run_steps

from megaqwen.models.config import get_config
from megaqwen.models.qwen2 import build_model
from megaqwen.parallel.checkpoint import load_sharded_state, sharded_state

pytestmark = pytest.mark.distributed
KV1 = {"vocab_size": 1024, "num_kv_heads": 1}  # one KV head: replicated on both ranks at tp=2
CASES = [(Layout(tp=2, dp=2), {}), (Layout(tp=4, sp=True), {}), (Layout(tp=2, dp=2, mode="zero1"), {}),
         (Layout(tp=2, dp=2, mode="fsdp"), {}), (Layout(dp=4, mode="fsdp"), {}),
         (Layout(tp=2, dp=2, mode="fsdp", sp=True), KV1)]


def _cfg(overrides: dict):
    return get_config("debug", **{"vocab_size": 1024, **overrides})


def _step(run, cfg, s: int) -> float:
    """Step `s` of the run (the trainer's `train_step`): its loss."""
    return run_steps(run, global_batches(cfg)[s:s + 1], first_step=s)[0]["loss"]


def _full_params(plain, shards) -> dict[str, torch.Tensor]:
    """Unsharded parameters gathered from FSDP and TP shards (one copy of replicated KV heads)."""
    return {n: gather_full(p.detach(), n, shards).clone() for n, p in plain.named_parameters()}


def resume_worker(rank: int, world: int, cases, root: str) -> dict:
    out = {}
    for layout, overrides in cases:
        cfg = _cfg(overrides)
        run = build_run(layout_config(cfg, layout))  # the trainer's builders
        for s in range(2):
            _step(run, cfg, s)
        path = f"{root}/{layout.name}"
        dcp.save(sharded_state(run.model, run.optimizer, run.shards), checkpoint_id=path)
        full = _full_params(run.plain, run.shards)
        uninterrupted = _step(run, cfg, 2)

        run = build_run(layout_config(cfg, layout))
        with torch.no_grad():  # a different start: only the checkpoint can make the losses agree
            for p in run.model.parameters():
                p.mul_(0.5)
        state = sharded_state(run.model, run.optimizer, run.shards)
        dcp.load(state, checkpoint_id=path)
        load_sharded_state(state, run.model, run.optimizer, run.shards)
        resumed = _step(run, cfg, 2)
        out[layout.name] = (uninterrupted, resumed, full, path, overrides)
    return out


def test_resume_same_layout_and_load_unsharded(tmp_path):
    results = spawn(resume_worker, 4, CASES, str(tmp_path))
    for name, (uninterrupted, resumed, full, path, overrides) in results.items():
        assert resumed == pytest.approx(uninterrupted, rel=1e-6), (name, uninterrupted, resumed)
        # the same files load into one unsharded model in this (non-distributed) process
        model = build_model(_cfg(overrides))
        state = {"model": {k: torch.zeros_like(v) for k, v in model.state_dict().items()}}
        dcp.load(state, checkpoint_id=path, no_dist=True)
        for k, want in full.items():
            torch.testing.assert_close(state["model"][k], want, rtol=0, atol=0, msg=f"{name} {k}")
