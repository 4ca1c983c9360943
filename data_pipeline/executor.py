"""Run a stage's tasks locally (processes), on Ray, or as one rank of a SLURM array, resumably.

A task is one unit of a stage (an input shard for the filter stage, one domain for sharding...).
When a task finishes it writes `markers/<stage>/<task>.json` holding its stats; its outputs were
already renamed into place, so a marker means "done and complete". A rerun skips tasks that have
a marker and redoes the rest from scratch (a killed task left only temporary files, which are
overwritten). Rank r of a world of w processes (SLURM: array index / array size) runs tasks
r, r + w, r + 2w, ... The markers are the same whatever ran the task (in-process, local worker
processes, a Ray task, a SLURM array task), so a run can move between executors and resume.

A marker also holds the stage's config fingerprint (`fingerprint.py`): a marker written under
another config does not count as done, so a changed config re-runs the task instead of reusing it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from megaqwen.data_pipeline.process_pool import run_in_processes

log = logging.getLogger("megaqwen.data_pipeline")

# set in each worker process: progress(docs, tokens, bytes) goes to the parent's progress bar
_PROGRESS_SINK: Any = None


def set_progress_sink(sink) -> None:
    global _PROGRESS_SINK
    _PROGRESS_SINK = sink


def report_progress(docs: int = 0, tokens: int = 0, nbytes: int = 0) -> None:
    """Called by task functions every few hundred documents; cheap and safe without a bar."""
    if _PROGRESS_SINK is not None:
        _PROGRESS_SINK(docs, tokens, nbytes)
    elif _LOCAL_BAR is not None:
        _LOCAL_BAR.add(docs, tokens, nbytes)


class _Bar:
    """tqdm over input bytes (known up front, so ETA is meaningful) with docs/s and tokens/s."""

    def __init__(self, stage: str, total_bytes: int | None, disable: bool):
        self.t0 = time.perf_counter()
        self.docs = self.tokens = 0
        # while the bar is drawn, this process's log lines go through tqdm.write: printed above the
        # bar instead of into the middle of it
        self._redirect = contextlib.nullcontext() if disable else logging_redirect_tqdm()
        self._redirect.__enter__()
        self.bar = tqdm(
            total=total_bytes or None, unit="B", unit_scale=True, desc=stage, disable=disable, mininterval=0.5
        )

    def add(self, docs: int, tokens: int, nbytes: int) -> None:
        self.docs += docs
        self.tokens += tokens
        dt = max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(
            f"{self.docs} docs, {self.docs / dt:.0f} docs/s, {self.tokens / dt:.0f} tok/s", refresh=False
        )
        self.bar.update(nbytes)

    def close(self) -> None:
        self.bar.close()
        self._redirect.__exit__(None, None, None)


_LOCAL_BAR: _Bar | None = None


def marker_path(out_dir: Path, stage: str, task: int) -> Path:
    return out_dir / "markers" / stage / f"{task:05d}.json"


def marker_fingerprints(out_dir: Path, stage: str) -> dict[int, str | None]:
    """`{task: fingerprint}` of the stage's markers (None: written before fingerprints existed)."""
    d = out_dir / "markers" / stage
    if not d.is_dir():
        return {}
    return {int(p.stem): json.loads(p.read_text()).get("fingerprint") for p in d.glob("*.json")}


def done_tasks(out_dir: Path, stage: str, fingerprint: str | None = None) -> set[int]:
    """Tasks with a marker (written under `fingerprint`, when one is given)."""
    if fingerprint is None:
        d = out_dir / "markers" / stage
        return {int(p.stem) for p in d.glob("*.json")} if d.is_dir() else set()
    return {t for t, fp in marker_fingerprints(out_dir, stage).items() if fp == fingerprint}


def require_complete(out_dir: Path, stage: str, n_tasks: int, fingerprint: str | None = None) -> None:
    missing = sorted(set(range(n_tasks)) - done_tasks(out_dir, stage, fingerprint))
    if missing:
        why = "no marker" if fingerprint is None else "no marker written under this config"
        raise RuntimeError(
            f"stage {stage!r} is incomplete in {out_dir}: tasks {missing[:20]} of {n_tasks} "
            f"have {why}; run that stage first"
        )


def load_markers(out_dir: Path, stage: str) -> list[dict[str, Any]]:
    d = out_dir / "markers" / stage
    return [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))] if d.is_dir() else []


def remove_markers(out_dir: Path, stage: str, tasks: set[int]) -> None:
    for t in tasks:
        marker_path(out_dir, stage, t).unlink(missing_ok=True)


def _write_marker(out_dir: Path, stage: str, task: int, result: dict[str, Any]) -> None:
    p = marker_path(out_dir, stage, task)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, p)


def _run_one(fn: Callable[[int], dict[str, Any]], task: int) -> tuple[int, dict[str, Any]]:
    t0 = time.perf_counter()
    result = fn(task)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return task, result


def run_tasks(
    stage: str,
    n_tasks: int,
    fn: Callable[[int], dict[str, Any]],
    out_dir: Path,
    workers: int = 1,
    rank: int = 0,
    world: int = 1,
    total_bytes: int | None = None,
    progress: bool = True,
    executor: str = "local",
    ray_address: str = "",
    describe: Callable[[int], str] | None = None,
    fingerprint: str | None = None,
) -> list[int]:
    """Run the unfinished tasks of `stage` owned by this rank; returns the task ids it ran.

    `fn(task)` must write its outputs atomically and return a JSON-able stats dict, which becomes the
    task's marker. With `workers > 1` tasks run in spawned processes (`executor="local"`) or as Ray
    tasks (`executor="ray"`, `workers` CPUs on a local instance or the cluster at `ray_address`), so
    `fn` must be picklable. Markers are the same for every executor, so a run can move between them.
    Raises `TaskError` naming every task that failed (raised, or whose worker died). With a
    `fingerprint`, only markers holding it count as done, and new markers hold it.
    """
    global _LOCAL_BAR
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside a world of {world}")
    if executor not in ("local", "ray"):
        raise ValueError(f"executor must be local or ray, got {executor!r}")
    describe = describe or (lambda t: f"task {t}")
    mine = [t for t in range(rank, n_tasks, world)]
    finished = done_tasks(out_dir, stage, fingerprint)
    todo = [t for t in mine if t not in finished]
    if len(todo) < len(mine):
        log.info(
            "%s: %d of %d tasks already done (markers in %s), skipping them",
            stage,
            len(mine) - len(todo),
            len(mine),
            out_dir / "markers" / stage,
        )
    if not todo:
        return []
    bar = _Bar(stage, total_bytes, disable=not progress)

    def done(task: int, result: dict[str, Any]) -> None:
        if fingerprint is not None:
            result = {**result, "fingerprint": fingerprint}
        _write_marker(out_dir, stage, task, result)
        if executor == "ray":  # Ray tasks report no progress on the way: count the task's docs here
            bar.add(0, 0, 0)

    try:
        if executor == "ray":
            from megaqwen.data_pipeline.ray_executor import run_on_ray

            run_on_ray(stage, todo, fn, max(workers, 1), done, describe, ray_address)
        elif workers <= 1 or len(todo) == 1:
            _LOCAL_BAR = bar
            for t in todo:
                try:
                    done(*_run_one(fn, t))
                except Exception as e:  # the error keeps its type; the note names the task
                    e.add_note(f"in task {t} of stage {stage!r} ({describe(t)}); finished tasks kept "
                               "their markers, a rerun resumes")
                    raise
        else:
            run_in_processes(stage, todo, fn, workers, done, bar.add, describe, set_progress_sink)
    finally:
        _LOCAL_BAR = None
        bar.close()
    return todo
