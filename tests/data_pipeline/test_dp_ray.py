"""The Ray executor on a local Ray instance: same markers, so a run moves between executors and resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megaqwen.data_pipeline.config import PipelineConfig
from megaqwen.data_pipeline.executor import done_tasks, run_tasks
from megaqwen.data_pipeline.io import read_documents
from megaqwen.data_pipeline.pipeline import run_stage
from megaqwen.data_pipeline.process_pool import TaskError

ray = pytest.importorskip("ray", reason="ray is in the data extra; without it the Ray executor cannot run")

TEXT = (
    "The river rises in the hills north of the town and flows south for forty kilometres. "
    "Walkers should keep to the marked paths during the nesting season, document {i}."
)


def _cfg(tmp: Path, corpus: Path, out: str) -> PipelineConfig:
    cfg = PipelineConfig()
    cfg.input.paths, cfg.input.parts_per_file, cfg.output_dir = [str(corpus)], 4, str(tmp / out)
    cfg.steps = [{"name": "content_type"}, {"name": "normalize"}, {"name": "pii"}]
    cfg.workers = 2
    return cfg


def _fail_on_two(t: int) -> dict:
    if t == 2:
        raise ValueError("bad input")
    return {"task": t}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_run_moves_from_local_to_ray_and_back(tmp_path: Path, local_ray):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(
        "".join(json.dumps({"id": str(i), "text": TEXT.format(i=i)}) + "\n" for i in range(200))
    )
    mixed = _cfg(tmp_path, corpus, "mixed")
    assert run_stage(mixed, "filter", rank=0, world=2, workers=1, progress=False) == [0, 2]  # locally: half
    mixed.executor.kind = "ray"
    assert run_stage(mixed, "filter", progress=False) == [1, 3]  # Ray resumes from the markers
    mixed.executor.kind = "local"
    assert run_stage(mixed, "filter", progress=False) == []  # and local sees Ray's markers as done
    run_stage(mixed, "dedup", progress=False)
    clean = _cfg(tmp_path, corpus, "clean")
    for s in ("filter", "dedup"):
        run_stage(clean, s, progress=False)

    def docs(cfg):
        return [
            (d.id, d.text)
            for t in range(4)
            for d in read_documents(cfg.out / "filtered" / f"{t:05d}.jsonl.zst")
        ]

    assert docs(mixed) == docs(clean) and len(docs(clean)) == 200
    assert (mixed.out / "dedup" / "duplicates.json").read_text() == (
        clean.out / "dedup" / "duplicates.json"
    ).read_text()

    # a failing Ray task is named; the others keep their markers
    with pytest.raises(TaskError, match=r"task 2 of stage 'x' \(task 2\) failed on ray: .*bad input"):
        run_tasks("x", 4, _fail_on_two, tmp_path / "x", workers=2, progress=False, executor="ray")
    assert done_tasks(tmp_path / "x", "x") == {0, 1, 3}
