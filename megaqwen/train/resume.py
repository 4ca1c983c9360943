"""The resume contract: what a checkpoint must share with the run that continues it.

Every checkpoint's meta.json carries `resume`, a flat dict of the settings that decide what the
weights and the data position mean: the model, sample length, global batch, seed, data (path,
held-out split, a size fingerprint of the shards), the engine and the parallel layout. A resume
compares it with the new run's and stops with a table of the differences, unless the run lists
them in `train.allow_changes` (keys, or whole sections: `data`, `model`, `parallel`). A
context-extension stage, for instance, resumes the 4K run with
`train.allow_changes=[train.seq_len,model.rope_theta,model.max_position_embeddings,data.path]`.

When an allowed change alters the sample stream (data, seq_len, seed, split), the new stream
starts at its first sample while the step count continues; a changed global batch keeps the
position in the same stream.

Both engines write the same torch.distributed.checkpoint keys, so `train.engine` changes on resume
like a layout key (`train.allow_changes=[train.engine,parallel]`; parallel.zero_stage is a layout
key of the DeepSpeed engine). Only a checkpoint in DeepSpeed's own format (a `deepspeed/` tag
folder, written by the DeepSpeed engine before it wrote DCP) is refused to the native engine and to
any layout change: `megaqwen-convert from-deepspeed` rewrites it as DCP.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from megaqwen.train.config import Config
from megaqwen.train.data_check import shard_prefixes
from megaqwen.train.errors import UsageError, did_you_mean

ENGINE_KEY = "train.engine"
MODEL_FREE = ("name", "init_std")  # labels and init-only settings: free to change on resume
# keys whose change starts a new sample stream (the checkpoint's consumed_samples is meaningless)
STREAM_KEYS = ("data.path", "data.shards", "data.valid_fraction", "train.seq_len", "train.seed")
# allowing a key allows these too: new data at a new path has new shards
IMPLIED = {"data.path": ("data.shards",)}


def data_fingerprint(path: str, out_dir: str | Path) -> str | None:
    """'N shard(s), B bytes' of the shard files `path` names; None when they are not there yet."""
    try:
        prefixes = shard_prefixes(path, out_dir)
    except (ValueError, FileNotFoundError):
        return None
    files = [Path(f"{p}{ext}") for p in prefixes for ext in (".bin", ".idx")]
    if not all(f.is_file() for f in files):
        return None
    return f"{len(prefixes)} shard(s), {sum(f.stat().st_size for f in files):,} bytes"


def contract(cfg: Config, world_size: int) -> dict[str, Any]:
    """The settings a checkpoint of this run is only valid under (flat, dotted keys)."""
    t, d, p = cfg.train, cfg.data, cfg.parallel
    out = {f"model.{k}": v for k, v in dataclasses.asdict(cfg.model).items() if k not in MODEL_FREE}
    out.update({"train.seq_len": t.seq_len, "train.global_batch_size": t.global_batch_size,
                "train.seed": t.seed, "data.path": d.path, "data.valid_fraction": d.valid_fraction,
                "data.reset_position_ids": d.reset_position_ids, "data.document_mask": d.document_mask,
                "data.shards": data_fingerprint(d.path, t.out_dir), ENGINE_KEY: t.engine,
                "parallel.world_size": world_size, "parallel.tp": p.tp, "parallel.pp": p.pp,
                "parallel.cp": p.cp, "parallel.ep": p.ep, "parallel.dp_mode": p.dp_mode})
    if t.engine == "deepspeed":
        out["parallel.zero_stage"] = p.zero_stage
    return out


def saved_contract(meta: dict[str, Any]) -> dict[str, Any]:
    """The contract stored in meta.json; checkpoints written before it existed give what their full
    config copy holds (layout and fingerprint stay unknown, and unknown keys are not compared)."""
    if "resume" in meta:
        return meta["resume"]
    cfg = meta.get("config")
    if not cfg:
        return {}
    flat = {f"model.{k}": v for k, v in cfg.get("model", {}).items() if k not in MODEL_FREE}
    for section, keys in (("train", ("seq_len", "global_batch_size", "seed", "engine")),
                          ("data", ("path", "reset_position_ids", "document_mask"))):
        flat.update({f"{section}.{k}": cfg[section][k] for k in keys if k in cfg.get(section, {})})
    return flat


def saved_engine(ckpt: Path) -> str | None:
    """A checkpoint folder's format, from its files: "deepspeed" for DeepSpeed's own (its tag
    folder; only the DeepSpeed engine with an unchanged layout reads it), "native" for DCP's
    .metadata (either engine reads it)."""
    if (ckpt / "deepspeed").is_dir():
        return "deepspeed"
    if (ckpt / ".metadata").is_file():
        return "native"
    return None


def check_allow_changes(allowed: list[str], keys: list[str]) -> None:
    sections = sorted({k.split(".", 1)[0] for k in keys})
    for a in allowed:
        if a not in keys and a not in sections:
            raise UsageError(f"train.allow_changes: {a!r} is not a resume-contract key"
                             f"{did_you_mean(a, keys + sections)}; keys: {', '.join(keys)}")


def _allowed(key: str, allowed: list[str]) -> bool:
    allowed = allowed + [k for a in allowed for k in IMPLIED.get(a, ())]
    return any(key == a or key.startswith(a + ".") for a in allowed)


def convert_command(ckpt: Path, meta: dict[str, Any]) -> str:
    n = saved_contract(meta).get("parallel.world_size") or "N"  # DeepSpeed ran under torchrun
    return f"torchrun --nproc-per-node {n} -m megaqwen.convert.cli from-deepspeed {ckpt} --out NEW_RUN_FOLDER"


def legacy_deepspeed(ckpt: Path, meta: dict[str, Any], why: str) -> str:
    return (f"{ckpt} is in DeepSpeed's own checkpoint format (written by train.engine=deepspeed before "
            f"both engines wrote torch.distributed.checkpoint), which {why}: convert it with "
            f"`{convert_command(ckpt, meta)}`, then resume train.out_dir=NEW_RUN_FOLDER with "
            "train.allow_changes=[train.engine,parallel]; or resume with train.engine=deepspeed and the "
            "checkpoint's parallel settings")


def compare(ckpt: Path, meta: dict[str, Any], current: dict[str, Any],
            allowed: list[str]) -> dict[str, tuple[Any, Any]]:
    """The allowed differences (key -> (checkpoint, this run)); UsageError for any other."""
    saved = saved_contract(meta)
    legacy = saved_engine(ckpt) == "deepspeed"
    if legacy and current[ENGINE_KEY] != "deepspeed":
        raise UsageError(legacy_deepspeed(ckpt, meta, f"train.engine={current[ENGINE_KEY]} cannot read"))
    diffs = {k: (saved[k], v) for k, v in current.items()
             if saved.get(k) is not None and v is not None and saved[k] != v}
    layout = [k for k in diffs if k.startswith("parallel.")]
    if legacy and layout:
        raise UsageError(legacy_deepspeed(ckpt, meta, f"does not reshard ({', '.join(layout)} changed)"))
    refused = {k: d for k, d in diffs.items() if not _allowed(k, allowed)}
    if refused:
        raise UsageError(mismatch_table(ckpt, refused))
    return diffs


def mismatch_table(ckpt: Path, diffs: dict[str, tuple[Any, Any]]) -> str:
    rows = [("setting", "checkpoint", "this run")] + [(k, str(a), str(b)) for k, (a, b) in diffs.items()]
    w0, w1 = (max(len(r[i]) for r in rows) for i in (0, 1))
    table = "\n".join(f"  {a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows)
    return (f"cannot resume {ckpt}: this run differs from the run that wrote it in\n{table}\n"
            f"Continuing would train under settings the checkpoint was not made with. Use a new "
            f"train.out_dir for a new run, go back to the checkpoint's values, or allow the change "
            f"explicitly: train.allow_changes=[{','.join(diffs)}]")


def restarts_stream(diffs: dict[str, tuple[Any, Any]]) -> bool:
    return any(k in diffs for k in STREAM_KEYS)
