"""The distributed dedup stages on a local Ray instance remove what the single in-memory task removes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from megaqwen.data_pipeline.config import load_config
from megaqwen.data_pipeline.lsh_stages import removal_records
from megaqwen.data_pipeline.pipeline import run_stage

ray = pytest.importorskip("ray", reason="ray is in the data extra; without it the Ray executor cannot run")


@pytest.mark.slow  # starting Ray takes ~10-20 s on 2 cores
@pytest.mark.distributed
def test_distributed_dedup_on_ray_equals_the_single_task(tmp_path: Path):
    def cfg(out: Path, band_tasks: int):
        c = load_config(
            "sample",
            {"output_dir": str(out), "workers": 2, "steps": [{"name": "normalize"}]},
            sets=[f"dedup.band_tasks={band_tasks}"],
        )
        c.min_mb_per_worker = 0
        return c

    single = cfg(tmp_path / "single", 0)
    run_stage(single, "filter", workers=1, progress=False)
    shutil.copytree(single.out, tmp_path / "ray")
    run_stage(single, "dedup", workers=1, progress=False)
    want = json.loads((single.out / "dedup" / "duplicates.json").read_text())
    dist = cfg(tmp_path / "ray", 4)
    dist.executor.kind = "ray"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for s in ("dedup_bands", "dedup_buckets", "dedup"):
            assert run_stage(dist, s, progress=False)  # every task ran (on Ray)
    finally:
        ray.shutdown()
    got = {str(t): removal_records(dist, t) for t in range(4)}
    assert sum(map(len, want.values())) > 10
    assert {t: v for t, v in got.items() if v} == want
