"""Per-rank parameter bytes fall as 1/tp (local shards counted on the meta device: no memory used)."""

from __future__ import annotations

import pytest
from parallel_harness import spawn

from megaqwen.models.config import get_config
from megaqwen.models.qwen2 import build_model
from megaqwen.models.spec import get_spec
from megaqwen.parallel.dims import ParallelDims
from megaqwen.parallel.shards import local_param_bytes

pytestmark = pytest.mark.distributed


def expected_bytes(cfg, tp: int) -> int:
    """fp32 bytes per rank from the config alone: everything /tp except norms (replicated) and
    KV projections, which are replicated tp/num_kv_heads times when tp > num_kv_heads."""
    norms = (2 * cfg.num_layers + 1) * cfg.hidden_size
    kv = cfg.num_layers * 2 * (cfg.hidden_size * cfg.kv_dim + (cfg.kv_dim if cfg.qkv_bias else 0))
    reps = max(1, tp // cfg.num_kv_heads)
    sharded = cfg.num_params() - norms - kv
    return 4 * (sharded // tp + norms + kv * reps // tp)


def memory_worker(rank: int, world: int, cases: list[tuple[str, int]]) -> dict:
    out = {}
    for name, tp in cases:
        cfg = get_config(name)
        mesh = ParallelDims(world_size=world, tp=tp).build_mesh("cpu")
        model = build_model(cfg, device="meta")
        get_spec(cfg).parallelize_tp(model, mesh)
        out[(name, tp)] = local_param_bytes(model)
    return out


def test_param_bytes_fall_as_one_over_tp():
    cases = [("debug", 1), ("debug", 2), ("debug", 4), ("qwen2.5-0.5b", 1), ("qwen2.5-0.5b", 2)]
    got = spawn(memory_worker, 4, cases)
    for (name, tp), nbytes in got.items():
        cfg = get_config(name)
        assert nbytes == expected_bytes(cfg, tp), (name, tp, nbytes)
        full = got[(name, 1)]
        assert full == 4 * cfg.num_params()
        # within 2% of full/tp: only norms (and replicated KV at tp=4) stay whole
        assert nbytes <= full / tp * 1.02, (name, tp, nbytes / full)
