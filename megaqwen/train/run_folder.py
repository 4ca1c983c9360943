"""What a run asks of its folder before any model exists: inputs there, resume allowed, folder free.

    run = RunFolder(cfg, world_size)
    run.check()        # read-only (the launcher's pre-flight): data paths, resume contract, lock
    run.open(rank)     # collective: check(), then rank 0 takes the lock and drops the metrics rows
                       # past the checkpoint (they are re-done, so steps never appear twice)
    ...
    meta["resume"] = run.contract       # into every checkpoint
    run.heartbeat()                     # every step
    run.close()
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megaqwen.train import checkpoint as ckpt
from megaqwen.train import resume
from megaqwen.train.config import Config
from megaqwen.train.data_check import check_data_path
from megaqwen.train.errors import UsageError
from megaqwen.train.run_lock import RunLock

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"


class RunFolder:
    def __init__(self, cfg: Config, world_size: int):
        self.cfg = cfg
        self.out_dir = Path(cfg.train.out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        self.lock = RunLock(self.out_dir, cfg.train.lock_timeout_min)
        self._contract = resume.contract(cfg, world_size)
        self.latest: Path | None = None
        """The checkpoint this run resumes (None: a fresh start)."""
        self.resume_step = 0
        self.changes: dict[str, tuple[Any, Any]] = {}
        """Allowed differences from the checkpoint's contract: key -> (checkpoint, this run)."""
        self.damaged: list[Path] = []
        """Newer checkpoints that failed their checksums (train.on_bad_checkpoint=fallback)."""

    @property
    def contract(self) -> dict[str, Any]:
        """This run's resume contract, for meta.json (the shard fingerprint of data.path=sample only
        exists once the run has tokenised the corpus)."""
        if self._contract["data.shards"] is None:
            self._contract["data.shards"] = resume.data_fingerprint(self.cfg.data.path, self.out_dir)
        return self._contract

    @property
    def nothing_to_do(self) -> bool:
        return self.resume_step >= self.cfg.train.steps

    def check(self, lock: bool = True, deep: bool = False) -> None:
        """Model-free checks of inputs and folder (and, with `lock`, that no other job holds it);
        UsageError with what to change. The checkpoint to resume is checked against the file sizes
        in its meta.json, and with `deep` (collective when distributed) against the CRCs too."""
        t, d = self.cfg.train, self.cfg.data
        check_data_path("data.path", d.path, t.out_dir)
        if d.valid_path is not None:
            check_data_path("data.valid_path", d.valid_path, t.out_dir)
        resume.check_allow_changes(list(t.allow_changes), list(self._contract))
        try:
            if t.resume:
                latest, self.damaged = ckpt.resume_checkpoint(self.ckpt_root, t.on_bad_checkpoint, deep)
                if latest is not None and not deep and ckpt.read_meta(latest)["step"] >= t.steps:
                    # "nothing to train" is decided here, not after open()'s CRC check: check them now
                    latest, self.damaged = ckpt.resume_checkpoint(self.ckpt_root, t.on_bad_checkpoint, True)
            else:
                latest = ckpt.latest_checkpoint(self.ckpt_root)
        except FileNotFoundError as e:
            raise UsageError(str(e)) from e
        if latest is not None and not t.resume:
            raise UsageError(f"{self.out_dir} already holds checkpoints up to {latest.name}; "
                             "train.resume=false would start a second run on top of them. Use a new "
                             f"train.out_dir, or delete {self.ckpt_root} to start this folder over")
        if latest is not None:
            meta = ckpt.read_meta(latest)
            self.changes = resume.compare(latest, meta, self._contract, list(t.allow_changes))
            self.latest, self.resume_step = latest, int(meta["step"])
        if lock:
            self.lock.check()

    def open(self, rank: int) -> None:
        """Collective: check() on every rank, then rank 0 takes the lock and truncates metrics. When
        any of that fails on any rank, every rank raises the same UsageError (so rank 0 reports it)."""
        error = ""
        try:
            self.check(lock=False, deep=True)  # (the lock: rank 0 alone, or the others would see rank 0's)
            if rank == 0:
                self.lock.acquire()
        except UsageError as e:
            error = str(e)
        if dist.is_available() and dist.is_initialized():
            errors: list[str] = [""] * dist.get_world_size()
            dist.all_gather_object(errors, error)
            error = next((e for e in errors if e), "")
        if error:
            self.lock.release()
            raise UsageError(error)
        if rank != 0:
            return
        if self.damaged:  # now that this job holds the folder
            ckpt.set_aside(self.ckpt_root, self.damaged, self.latest)
        truncate_metrics(self.out_dir / METRICS, self.resume_step)
        if self.nothing_to_do:
            log.info("nothing to train: %s is at step %d and train.steps=%d (raise train.steps to go on)",
                     self.latest, self.resume_step, self.cfg.train.steps)
        if self.changes:
            log.info("resuming %s with allowed changes: %s%s", self.latest,
                     ", ".join(f"{k} {a} -> {b}" for k, (a, b) in self.changes.items()),
                     "; the new sample stream starts at its first sample" if self.restarts_stream else "")

    @property
    def restarts_stream(self) -> bool:
        return resume.restarts_stream(self.changes)

    def data_position(self, consumed_samples: int) -> int:
        """Where the sample stream resumes: the checkpoint's position, or 0 for a new stream."""
        return 0 if self.restarts_stream else consumed_samples

    def heartbeat(self) -> None:
        self.lock.refresh()

    def close(self) -> None:
        self.lock.release()


def truncate_metrics(path: Path, last_step: int) -> int:
    """Drop rows of steps after `last_step` (and a torn last line); returns how many were dropped."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if row.get("step", 0) <= last_step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
        log.info("%s: dropped %d row(s) after step %d, which this run does again", path, dropped, last_step)
    return dropped
