"""Checksums of a checkpoint's files: recorded in meta.json when it is saved, checked before a resume.

    meta.json["files"] = {"__0_0.distcp": {"bytes": 1234, "crc32": "1a2b3c4d"}, ".metadata": {...}}

Every file the save wrote into the step folder (each rank's DCP shards and DCP's `.metadata`) is
listed with its size and CRC-32. The work is split over the ranks that wrote the checkpoint: rank
0's sorted file list is dealt out (rank r takes files r, r + world, ...), each rank streams its
files through zlib.crc32 (about 2 GB/s on one core: a 1 TB checkpoint over 64 ranks adds ~8 s to a
synchronous save, none to a background one) and the pieces are gathered. A resume checks the same
way: every rank checks the sizes of all files (a stat each) and the CRCs of its share, and the ranks
agree on the first problem found, so they all pick the same checkpoint. CRC-32 is for corruption
(truncation, flipped bits, a half-copied folder), not tampering.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import torch.distributed as dist

META = "meta.json"
CHUNK = 8 << 20  # bytes read per zlib.crc32 call (zlib releases the GIL on large buffers)


def _share(group=None) -> tuple[int, int]:
    """(rank, world) of `group` (the default group when None); (0, 1) without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def file_sum(path: Path) -> dict[str, Any]:
    """{"bytes": size, "crc32": 8 hex digits} of one file, read in CHUNK pieces."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            crc, size = zlib.crc32(block, crc), size + len(block)
    return {"bytes": size, "crc32": f"{crc:08x}"}


def written_files(folder: Path) -> list[str]:
    """Sorted paths (relative to `folder`) of every file in it but meta.json."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != META)


def _all_gather(obj: Any, group, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


def gather_sums(folder: Path, group=None) -> dict[str, dict[str, Any]]:
    """Collective over `group` once every rank's write of `folder` is complete: the checksums of
    all its files, each file read by one rank; the same dict on every rank. The file list is rank
    0's (one listing, whatever another host's directory cache shows); a file a rank cannot read
    fails the save on every rank (OSError naming rank and file), never just on one."""
    rank, world = _share(group)
    names = [written_files(folder)] if rank == 0 else [None]
    if world > 1:
        dist.broadcast_object_list(names, group=group, group_src=0)
    mine: dict[str, Any] = {}
    for name in names[0][rank::world]:
        try:
            mine[name] = file_sum(folder / name)
        except OSError as e:
            mine = {"error": f"rank {rank} could not read {folder / name} to checksum it ({e})"}
            break
    merged: dict[str, dict[str, Any]] = {}
    for part in _all_gather(mine, group, world):
        if "error" in part:
            raise OSError(part["error"])
        merged.update(part)
    return dict(sorted(merged.items()))


def _problem(folder: Path, name: str, want: dict[str, Any], deep: bool) -> str | None:
    try:
        return _compare(folder / name, name, want, deep)
    except OSError as e:  # a problem to agree on, not an exception on one rank while the others wait
        return f"{name} is unreadable ({e})"


def _compare(path: Path, name: str, want: dict[str, Any], deep: bool) -> str | None:
    if not path.is_file():
        return f"{name} is missing"
    size, saved = path.stat().st_size, want["bytes"]
    if size != saved:
        return (f"{name} has {size:,} bytes, meta.json records {saved:,} "
                f"({'truncated' if size < saved else 'grown'} after the save)")
    if deep:
        got = file_sum(path)["crc32"]
        if got != want["crc32"]:
            return (f"{name} has CRC-32 {got}, meta.json records {want['crc32']} "
                    "(its bytes changed after the save)")
    return None


def check(folder: Path, files: dict[str, dict[str, Any]], deep: bool, group=None) -> str | None:
    """Collective over `group` (when distributed): the first problem with `folder`'s recorded
    `files` ("<file>: what is wrong"), the same on every rank; None when they all pass. Every rank
    checks every file's presence and size; with `deep`, each rank also reads its share for CRCs."""
    rank, world = _share(group)
    names = sorted(files)
    found = {n: p for n in names if (p := _problem(folder, n, files[n], False)) is not None}
    if deep and not found:
        found = {n: p for n in names[rank::world] if (p := _problem(folder, n, files[n], True)) is not None}
    merged: dict[str, str] = {}
    for part in _all_gather(found, group, world):
        merged.update(part)
    return merged[min(merged)] if merged else None


def agree(problem: str | None, group=None) -> str | None:
    """Collective: the first problem any rank found (for checks every rank makes itself)."""
    _, world = _share(group)
    found = [p for p in _all_gather(problem, group, world) if p is not None]
    return found[0] if found else None
