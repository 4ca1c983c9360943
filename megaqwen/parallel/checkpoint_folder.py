"""Where a megaqwen checkpoint sits on disk, read side: what the trainer, the converters and eval share.

    checkpoints/step_00000020/   DCP shards + meta.json (`format`: FORMAT)
    checkpoints/latest           text file naming the newest complete step folder

`resolve_checkpoint` accepts a step folder, a checkpoints/ folder or a run folder; `read_meta` refuses
another format. Writing (atomic commit, pruning, integrity) is the trainer's (train/checkpoint.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

FORMAT = "megaqwen-dcp-v1"
"""meta.json's `format` of a checkpoint in our DCP layout."""
LATEST = "latest"
"""File in a checkpoints/ folder naming its newest complete step folder."""
MODEL_PREFIX = "model."
"""Top-level key of the model state inside a DCP checkpoint."""


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


def read_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Every model tensor of a checkpoint step folder, whole and in its stored dtype (one process)."""
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    state: dict[str, torch.Tensor] = {}
    for key, md in metadata.state_dict_metadata.items():
        if key.startswith(MODEL_PREFIX) and hasattr(md, "size"):
            state[key[len(MODEL_PREFIX):]] = torch.empty(md.size, dtype=md.properties.dtype)
    if not state:
        raise ValueError(f"{path}: checkpoint holds no model tensors")
    dcp.load({"model": state}, checkpoint_id=str(path))
    return state
