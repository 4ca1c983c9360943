"""Distributed checkpoints (torch.distributed.checkpoint) with atomic "latest" and resume.

Layout of a run folder:
    checkpoints/step_00000020/   DCP shards (.metadata, __<rank>_0.distcp) + meta.json
    checkpoints/latest           text file naming the newest complete step folder
(read side: `parallel/checkpoint_folder.py`, shared with convert and eval)

A save goes to `step_N.partial/` first; only after every rank has written its shard does rank 0
rename it to `step_N/` and then atomically replace `latest` (write + os.replace). A crash at any
point leaves `latest` naming the previous complete checkpoint; stale `.partial` folders are
removed by the next save.

meta.json records every file's size and CRC-32 (`integrity`, computed by the ranks once the write
is complete). A resume checks them before loading (`resume_checkpoint`): a checkpoint that fails is
named in one line (folder, file, what is wrong) and, with train.on_bad_checkpoint=fallback, the run
resumes from the newest earlier checkpoint that passes; the failed ones are set aside as
`step_N.damaged` and `latest` names the one resumed.

`Checkpointer` does the same in the background (`train.async_save`): the state is copied to CPU
memory, training goes on, and the commit (meta.json, rename, `latest`) happens when the write is
done - so a kill during an asynchronous save also leaves the previous checkpoint in charge. Its
checksums are taken in the background as well, after the write.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from megaqwen.parallel import checkpoint as parallel_ckpt
from megaqwen.parallel.checkpoint_folder import (
    FORMAT,
    LATEST,
    latest_checkpoint,  # noqa: F401  (the trainer's modules reach the read side through here)
    read_meta,
    resolve_checkpoint,
)
from megaqwen.parallel.shards import ShardMap
from megaqwen.train import integrity
from megaqwen.train.errors import UsageError

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"step_(\d{8})")


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def step_dir(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f"step_{step:08d}"


def save_checkpoint(ckpt_root: str | Path, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None, meta: dict[str, Any],
                    keep_last: int = 0, shards: ShardMap | None = None, keep_every: int = 0) -> Path:
    """Collective: every rank calls it. Returns the final step folder."""
    ckpt_root = Path(ckpt_root)
    partial = _begin(ckpt_root, step)
    parallel_ckpt.save(str(partial), model, optimizer, shards)  # TP shards / ZeRO-1 / DeepSpeed aware
    _barrier()
    files = integrity.gather_sums(partial)  # collective: each rank reads its share of the files
    if _rank() == 0:
        _commit(ckpt_root, step, meta, keep_last, keep_every, files)
    _barrier()
    return step_dir(ckpt_root, step)


def _partial(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f"{step_dir(ckpt_root, step).name}.partial"


def _begin(ckpt_root: Path, step: int) -> Path:
    """Collective, with no save in flight: rank 0 removes the `.partial` folders crashed saves left
    (this step's or another's); returns the folder this save writes, step_N.partial."""
    if _rank() == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_root.glob("step_*.partial"):
            shutil.rmtree(stale)
    _barrier()
    return _partial(ckpt_root, step)


def _commit(ckpt_root: Path, step: int, meta: dict[str, Any], keep_last: int, keep_every: int,
            files: dict[str, dict[str, Any]]) -> Path:
    """Rank 0, once every rank's shards of step_N.partial are written and summed: meta.json (with
    the files' sizes and CRCs), rename, `latest`."""
    final, partial = step_dir(ckpt_root, step), _partial(ckpt_root, step)
    record = {"format": FORMAT, "step": step, **meta, "files": files}
    (partial / "meta.json").write_text(json.dumps(record, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    _point_latest(ckpt_root, final)
    _prune(ckpt_root, keep_last, keep_every, upto=step)
    log.info("saved checkpoint %s", final)
    return final


def _point_latest(ckpt_root: Path, folder: Path) -> None:
    tmp = ckpt_root / (LATEST + ".tmp")
    tmp.write_text(folder.name)
    os.replace(tmp, ckpt_root / LATEST)


def _sums_after(write: Future, folder: Path, group) -> dict[str, dict[str, Any]]:
    """The background half of an asynchronous save: wait for the write, then (collective over the
    checkpointer's own group) the files' checksums."""
    write.result()
    return integrity.gather_sums(folder, group)


@dataclass
class _InFlight:
    step: int
    meta: dict[str, Any]
    future: Future
    started: float
    blocking_s: float


class Checkpointer:
    """The run's checkpoint writer: synchronous, or in the background with `async_save`.

    A background save copies this rank's state to CPU memory (DCP's stager: one extra copy of the
    rank's weights and optimizer state in host memory while it is written) and returns; the shards
    are written by a thread that talks over a gloo process group of its own, so its collectives
    never interleave with the training step's (either engine: DeepSpeed's state is gathered into
    fresh tensors first). DCP's coordinator (rank 0) finishes a save only
    after every rank's write has been gathered, so when rank 0's future is done the whole
    checkpoint is on disk and rank 0 commits it, at the next `poll`. A new save, a rollback and the
    end of the run wait for the save in flight first (`wait`).

    Metrics (returned; the trainer puts them on its next row): `checkpoint_blocking_s`, the time
    training stood still for the save (copy, plus any wait for the previous save), from `save`;
    `checkpoint_save_s`, start to commit, and `checkpoint_step`, from the call that commits.
    """

    def __init__(self, ckpt_root: str | Path, async_save: bool = False, keep_last: int = 0,
                 keep_every: int = 0):
        self.root, self.async_save = Path(ckpt_root), async_save
        self.keep_last, self.keep_every = keep_last, keep_every
        self._pending: _InFlight | None = None
        # collective when distributed: every rank builds its checkpointer at the same point
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self._group = dist.new_group(backend="gloo") if async_save and distributed else None
        self._sums = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-sums") if async_save else None

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
             meta: dict[str, Any], shards: ShardMap | None = None) -> dict[str, float]:
        """Collective. Returns the metrics of this save (and of the one it waited for)."""
        t0 = time.perf_counter()
        out = self.wait()
        if not self.async_save:
            save_checkpoint(self.root, step, model, optimizer, meta, self.keep_last, shards, self.keep_every)
            took = time.perf_counter() - t0
            return {**out, "checkpoint_blocking_s": took, "checkpoint_save_s": took,
                    "checkpoint_step": float(step)}
        partial = _begin(self.root, step)  # nothing is in flight now: any .partial is a crashed save's
        state = parallel_ckpt.save_state(model, optimizer, shards)
        write = dcp.async_save(state, checkpoint_id=str(partial), process_group=self._group)
        future = self._sums.submit(_sums_after, write, partial, self._group)
        blocking = time.perf_counter() - t0
        self._pending = _InFlight(step, meta, future, t0, blocking)
        log.info("checkpoint step %d: state copied in %.2f s, writing in the background", step, blocking)
        return {**out, "checkpoint_blocking_s": blocking}

    def poll(self) -> dict[str, float]:
        """Commit the save in flight if its write is done (not collective; call every step)."""
        if self._pending is None or not self._pending.future.done():
            return {}
        return self._finish()

    def wait(self) -> dict[str, float]:
        """Block until the save in flight (if any) is written and committed."""
        if self._pending is None:
            return {}
        return self._finish()

    def _finish(self) -> dict[str, float]:
        p, self._pending = self._pending, None
        try:
            files = p.future.result()
        except (Exception, CheckpointException) as e:  # DCP's is a BaseException
            # DCP wraps each rank's traceback; its last line is the cause ("OSError: ... No space left")
            cause = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise RuntimeError(f"asynchronous checkpoint of step {p.step} failed on rank {_rank()}: {cause}; "
                               f"{self.root / LATEST} still names the previous checkpoint") from e
        if _rank() == 0:
            _commit(self.root, p.step, p.meta, self.keep_last, self.keep_every, files)
        took = time.perf_counter() - p.started
        log.info("checkpoint step %d written in %.2f s, of which training waited %.2f s", p.step, took,
                 p.blocking_s)
        return {"checkpoint_save_s": took, "checkpoint_step": float(p.step)}

    def close(self) -> None:
        """Finish the save in flight; used on the way out of a run, errors are logged, not raised."""
        try:
            self.wait()
        except Exception as e:  # the run is already ending with its own error
            log.error("%s", e)
        if self._group is not None:
            with contextlib.suppress(Exception):  # a broken group (the run failed) needs no goodbye
                dist.destroy_process_group(self._group)
            self._group = None
        if self._sums is not None:
            self._sums.shutdown(wait=False, cancel_futures=True)


def load_checkpoint(path: str | Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None,
                    shards: ShardMap | None = None) -> dict[str, Any]:
    """Load model (and optimizer) state in place; returns meta.json's contents."""
    path = resolve_checkpoint(path)
    meta = read_meta(path)
    parallel_ckpt.load(str(path), model, optimizer, shards)
    return meta


def verify_checkpoint(path: Path, deep: bool = True) -> str | None:
    """Collective when distributed: what is wrong with the checkpoint folder `path` ("<file>: what
    is wrong"), the same on every rank, or None when its files match meta.json (sizes; with `deep`,
    CRCs too). A checkpoint saved before checksums were recorded passes, with a note."""
    problem, meta = None, {}
    if not path.is_dir():
        problem = "the folder is missing"
    elif not (path / "meta.json").is_file():
        problem = "meta.json is missing (the save never completed)"
    else:
        try:
            meta = read_meta(path)  # a foreign format is not damage: its ValueError stops the run
        except (OSError, json.JSONDecodeError) as e:
            problem = f"meta.json is unreadable ({e})"
    problem = integrity.agree(problem)
    if problem is not None:
        return problem
    if "files" not in meta:
        log.info("%s records no checksums (saved before they were recorded): resuming it unverified", path)
        return None
    return integrity.check(path, meta["files"], deep)


def resume_checkpoint(ckpt_root: str | Path, on_bad: str = "fallback",
                      deep: bool = True) -> tuple[Path | None, list[Path]]:
    """Collective when distributed: the checkpoint a resume loads - the one `latest` names if it
    passes `verify_checkpoint`, else (on_bad=fallback) the newest earlier one that does - and the
    newer ones that failed (for `set_aside`). None when there is no `latest`. UsageError, one line
    naming folder, file and problem, under on_bad=stop or when no checkpoint passes."""
    ckpt_root = Path(ckpt_root)
    pointer = ckpt_root / LATEST
    if not pointer.exists():
        return None, []
    named = ckpt_root / pointer.read_text().strip()
    m = STEP_DIR.fullmatch(named.name)
    top = int(m.group(1)) if m else None
    older = [p for s, p in reversed(_step_folders(ckpt_root)) if p != named and (top is None or s < top)]
    failed: list[tuple[Path, str]] = []
    for path in [named, *older]:
        problem = verify_checkpoint(path, deep)
        if problem is None:
            for bad, why in failed:
                log.warning("checkpoint %s fails its checks: %s; resuming from %s instead "
                            "(train.on_bad_checkpoint=fallback)", bad, why, path.name)
            return path, [bad for bad, _ in failed]
        if on_bad == "stop":
            raise UsageError(f"checkpoint {path} fails its checks: {problem}; restore the file, or "
                             "resume from the newest earlier checkpoint that passes: "
                             "train.on_bad_checkpoint=fallback")
        failed.append((path, problem))
    raise UsageError(f"no checkpoint in {ckpt_root} passes its checks ("
                     + "; ".join(f"{bad.name}: {why}" for bad, why in failed)
                     + "): restore the files, or start over in a new train.out_dir")


def set_aside(ckpt_root: Path, failed: list[Path], resumed: Path) -> None:
    """Rank 0, holding the run folder: rename the checkpoints that failed their checks to
    `step_N.damaged` (kept for inspection; never resumed or pruned) and point `latest` at the one
    resumed, so rollbacks, pruning and later resumes see only checkpoints up to it."""
    for path in failed:
        if not path.is_dir():
            continue
        aside, n = path.with_name(f"{path.name}.damaged"), 1
        while aside.exists():
            aside, n = path.with_name(f"{path.name}.damaged{n}"), n + 1
        os.replace(path, aside)
        log.warning("moved %s aside to %s (delete it once inspected)", path, aside.name)
    _point_latest(ckpt_root, resumed)


def _prune(ckpt_root: Path, keep_last: int, keep_every: int = 0, upto: int | None = None) -> None:
    """Delete all but the newest `keep_last` checkpoints up to step `upto` (the one just saved: a
    folder past it is not this run's history, and counting it would delete the new `latest`),
    sparing every step divisible by `keep_every` (long-term milestones). `.partial` and set-aside
    `.damaged` folders are not checkpoints here."""
    if keep_last <= 0:
        return
    done = [(s, p) for s, p in _step_folders(ckpt_root) if upto is None or s <= upto]
    for s, old in done[:-keep_last]:
        if keep_every and s % keep_every == 0:
            continue
        shutil.rmtree(old, ignore_errors=True)


def _step_folders(ckpt_root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every step_NNNNNNNN folder, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := STEP_DIR.fullmatch(p.name))]
    return sorted((s, p) for s, p in found if p.is_dir())
