"""On-disk layout, ids and hashing of the distributed MinHash LSH stages (`lsh_stages.py`).

    dedup_lsh/sigs/<task>.npy            (N, num_perm) uint64 MinHash signatures of one input task
    dedup_lsh/bands/<unit>/<task>.npy    BAND_DTYPE records of one input task, sorted by (key, gid)
    dedup_lsh/pairs/<task>.npz           one bucket task's verified pairs: exact, alias, near (E, 2)
    dedup/duplicates/<task>.npy          REMOVAL_DTYPE removals of one input task, by position

A unit is what one bucket task merges as a whole: `exact` (key = the exact-text hash) or `bNN`
(key = a 64-bit hash of LSH band NN's rows). A document's global id `gid = task << 40 | position`
orders documents as the single-task dedup does (task, then position) with no global offsets.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

GID_SHIFT = 40  # positions < 2^40 per input task, tasks < 2^23
BAND_DTYPE = np.dtype([("key", "<u8"), ("gid", "<i8"), ("sighash", "<u8")])  # 24 B per document
# kind 0: exact copy, 1: near duplicate (lsh_stages.KINDS)
REMOVAL_DTYPE = np.dtype([("pos", "<i8"), ("kept_task", "<i8"), ("kept_pos", "<i8"), ("kind", "u1")])
_MUL = np.uint64(0x100000001B3)  # FNV-1a prime


def gid(task: int, pos_N: np.ndarray) -> np.ndarray:
    return (np.int64(task) << GID_SHIFT) | pos_N.astype(np.int64)


def split_gid(gid_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(task, position) of each global id."""
    return gid_N >> GID_SHIFT, gid_N & ((1 << GID_SHIFT) - 1)


def row_hash(x_NC: np.ndarray, seed: int) -> np.ndarray:
    """(N,) uint64 hash of each row (FNV-1a over the 64-bit values, then a splitmix64 finaliser).
    Only a bucketing key: candidates are checked on the full signatures, so a collision costs a
    verification, never a wrong result."""
    with np.errstate(over="ignore"):
        h = np.full(len(x_NC), np.uint64(0xCBF29CE484222325) ^ np.uint64(seed), np.uint64)
        for c in range(x_NC.shape[1]):
            h = (h ^ x_NC[:, c]) * _MUL
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return h


def units(exact: bool, minhash: bool, num_bands: int) -> list[str]:
    return (["exact"] if exact else []) + ([f"b{b:02d}" for b in range(num_bands)] if minhash else [])


def units_of_task(all_units: list[str], band_tasks: int, task: int) -> list[str]:
    """Contiguous share of the units for bucket task `task` of `band_tasks`."""
    return [str(u) for u in np.array_split(np.array(all_units, dtype=object), band_tasks)[task]]


def sig_path(out: Path, task: int) -> Path:
    return out / "dedup_lsh" / "sigs" / f"{task:05d}.npy"


def band_path(out: Path, unit: str, task: int) -> Path:
    return out / "dedup_lsh" / "bands" / unit / f"{task:05d}.npy"


def pairs_path(out: Path, task: int) -> Path:
    return out / "dedup_lsh" / "pairs" / f"{task:05d}.npz"


def removals_path(out: Path, task: int) -> Path:
    return out / "dedup" / "duplicates" / f"{task:05d}.npy"


def save_npy(path: Path, a: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, a)
    os.replace(tmp, path)


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


class CorruptFile(RuntimeError):
    """An intermediate dedup file is missing, truncated or not what the stage wrote."""


def _corrupt(path: Path, why: str, stage: str) -> CorruptFile:
    return CorruptFile(
        f"{path}: {why}; delete it and the output folder's markers/{stage}/, then run stage {stage!r} again"
    )


def load_npy(
    path: Path, stage: str, dtype: np.dtype, ndim: int, cols: int | None = None, mmap: bool = True
) -> np.ndarray:
    """A `.npy` written by `stage`, memory-mapped, checked for dtype, rank and width."""
    try:
        a = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise _corrupt(path, "missing", stage) from None
    except (ValueError, OSError, EOFError) as e:
        raise _corrupt(path, f"unreadable or truncated ({type(e).__name__}: {e})", stage) from None
    if a.dtype != dtype or a.ndim != ndim or (cols is not None and a.shape[1] != cols):
        raise _corrupt(
            path,
            f"holds {a.dtype} {a.shape}, expected {dtype} with {ndim} dims"
            + (f" and {cols} columns" if cols is not None else ""),
            stage,
        )
    return a


def load_npz(path: Path, stage: str, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in keys}
    except FileNotFoundError:
        raise _corrupt(path, "missing", stage) from None
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise _corrupt(path, f"unreadable or truncated ({type(e).__name__}: {e})", stage) from None
