"""Distributed checkpoints (torch.distributed.checkpoint) with atomic "latest" and resume.

Layout of a run folder:
    checkpoints/step_00000020/   DCP shards (.metadata, __<rank>_0.distcp) + meta.json
    checkpoints/latest           text file naming the newest complete step folder

A save goes to `step_N.partial/` first; only after every rank has written its shard does rank 0
rename it to `step_N/` and then atomically replace `latest` (write + os.replace). A crash at any
point leaves `latest` naming the previous complete checkpoint; stale `.partial` folders are
removed by the next save.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp  # noqa: F401  (the writer behind parallel_ckpt; tests patch it)

from megaqwen.parallel import checkpoint as parallel_ckpt
from megaqwen.parallel.shards import ShardMap

log = logging.getLogger(__name__)

FORMAT = "megaqwen-dcp-v1"
LATEST = "latest"


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def step_dir(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f"step_{step:08d}"


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The newest complete checkpoint folder named by `latest`, or None if there is none."""
    ckpt_root = Path(ckpt_root)
    pointer = ckpt_root / LATEST
    if not pointer.exists():
        return None
    path = ckpt_root / pointer.read_text().strip()
    if not (path / "meta.json").exists():
        raise FileNotFoundError(f"{pointer} names {path}, which is not a complete checkpoint "
                                "(no meta.json); remove the pointer or restore the folder")
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a step folder, a checkpoints/ folder, or a run folder; return the step folder."""
    path = Path(path)
    if (path / "meta.json").exists():
        return path
    for root in (path, path / "checkpoints"):
        found = latest_checkpoint(root) if (root / LATEST).exists() else None
        if found is not None:
            return found
    raise FileNotFoundError(f"no megaqwen checkpoint at {path} (looked for meta.json, "
                            f"{LATEST} and checkpoints/{LATEST})")


def read_meta(path: str | Path) -> dict[str, Any]:
    meta_path = Path(path) / "meta.json"
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r} is not {FORMAT!r}")
    return meta


def save_checkpoint(ckpt_root: str | Path, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None, meta: dict[str, Any],
                    keep_last: int = 0, shards: ShardMap | None = None, keep_every: int = 0) -> Path:
    """Collective: every rank calls it. Returns the final step folder."""
    ckpt_root = Path(ckpt_root)
    final = step_dir(ckpt_root, step)
    partial = final.with_name(final.name + ".partial")
    if _rank() == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_root.glob("step_*.partial"):  # left by a crashed save (this step or another)
            shutil.rmtree(stale)
    _barrier()
    parallel_ckpt.save(str(partial), model, optimizer, shards)  # TP shards / ZeRO-1 / DeepSpeed aware
    _barrier()
    if _rank() == 0:
        meta = {"format": FORMAT, "step": step, **meta}
        (partial / "meta.json").write_text(json.dumps(meta, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        tmp = ckpt_root / (LATEST + ".tmp")
        tmp.write_text(final.name)
        os.replace(tmp, ckpt_root / LATEST)
        _prune(ckpt_root, keep_last, keep_every)
        log.info("saved checkpoint %s", final)
    _barrier()
    return final


def load_checkpoint(path: str | Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None,
                    shards: ShardMap | None = None) -> dict[str, Any]:
    """Load model (and optimizer) state in place; returns meta.json's contents."""
    path = resolve_checkpoint(path)
    meta = read_meta(path)
    parallel_ckpt.load(str(path), model, optimizer, shards)
    return meta


def _prune(ckpt_root: Path, keep_last: int, keep_every: int = 0) -> None:
    """Delete all but the newest `keep_last` checkpoints, sparing every step divisible by
    `keep_every` (long-term milestones)."""
    if keep_last <= 0:
        return
    done = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir() and not p.name.endswith(".partial"))
    for old in done[:-keep_last]:
        if keep_every and int(old.name.split("_")[1]) % keep_every == 0:
            continue
        shutil.rmtree(old, ignore_errors=True)
