"""Sample indexes built once and memory-mapped by every rank (Megatron's `.npy` index cache).

An entry is a folder `<root>/<kind>-<key>-<size>` of `.npy` arrays plus `meta.json`: `key` hashes every
input the arrays depend on, `size` is how far they were built (windows of a `GPTDataset`, period
entries of a blend). The orders are prefix-stable (`megaqwen.data.dataset`), so an entry built for a
longer run serves a shorter one: a lookup takes the smallest entry with size >= the need.

Who builds: the process with `IndexCache.builder` set (rank 0 of the job when the cache folder is on a
filesystem every node sees, `data.index_cache_shared=true`; local rank 0 of each node otherwise). It
writes into `<root>/.tmp-...` and renames the folder into place as its last act, so an entry that
exists is complete: a writer killed half-way leaves only a `.tmp-` folder, which no reader opens and
the next builder ignores. Every other rank polls for the entry (`timeout_s`, then a clear error).
Arrays are opened with `np.load(mmap_mode="r")`: a rank's resident memory is the pages it touches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import shutil
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

_HEADER_BYTES = 128  # a fixed .npy (v1.0) header, rewritten with the final length by NpyWriter.close
_POLL_S = 0.2


@dataclass(frozen=True)
class IndexCache:
    """Where sample indexes are cached and whether this process writes missing ones."""

    root: str | None = None
    """cache folder; None: `index-cache/` beside each dataset's first shard"""
    builder: bool = True
    """this process builds missing entries (others wait for them)"""
    timeout_s: float = 3600.0
    """how long a non-builder waits for an entry before giving up"""
    who: str = "this process"
    """the builder, for messages (e.g. "rank 0 of the job")"""

    @classmethod
    def for_rank(
        cls, setting: str, shared: bool, rank: int, local_rank: int, timeout_s: float
    ) -> IndexCache | None:
        """The cache of `data.index_cache` (auto | off | a folder) for this rank; None for off."""
        if setting == "off":
            return None
        builder = rank == 0 if shared else local_rank == 0
        who = "rank 0 of the job" if shared else "local rank 0 of this node"
        return cls(None if setting == "auto" else setting, builder, timeout_s, who)

    def folder(self, beside: str | Path) -> Path:
        return Path(self.root) if self.root else Path(beside).parent / "index-cache"


def cache_key(**inputs) -> str:
    """16 hex digits of the SHA-256 of the inputs (JSON, sorted keys)."""
    blob = json.dumps(inputs, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def find_entry(root: Path, kind: str, key: str, need: int) -> Path | None:
    """The smallest complete entry of (kind, key) with size >= need, or None."""
    best: tuple[int, Path] | None = None
    if not root.is_dir():
        return None
    for p in root.glob(f"{kind}-{key}-*"):
        try:
            size = int(p.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if size >= need and (p / "meta.json").is_file() and (best is None or size < best[0]):
            best = (size, p)
    return None if best is None else best[1]


def open_entry(path: Path) -> dict[str, np.ndarray]:
    """The entry's arrays, memory-mapped read-only."""
    meta = json.loads((path / "meta.json").read_text())
    arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in meta["arrays"]}
    for a in arrays.values():  # binary searches and scattered reads: no read-ahead of whole MBs
        m = getattr(a, "_mmap", None)
        if m is not None and hasattr(m, "madvise") and hasattr(mmap, "MADV_RANDOM"):
            m.madvise(mmap.MADV_RANDOM)
    return arrays


def load_or_build(
    cache: IndexCache,
    beside: str | Path,
    kind: str,
    key: str,
    need: int,
    size: int,
    build: Callable[[Path], list[str]],
    what: str,
) -> dict[str, np.ndarray]:
    """The arrays of entry (kind, key) covering `need`; built to `size` (>= need) by the builder.

    `build(tmp_folder)` writes the arrays (`NpyWriter` or np.save) and returns their names."""
    root = cache.folder(beside)
    found = find_entry(root, kind, key, need)
    if found is not None:
        log.info("index cache: reused %s (%s)", found, what)
        return open_entry(found)
    if cache.builder:
        return open_entry(_build(root, kind, key, size, build, what))
    return open_entry(_wait(cache, root, kind, key, need, what))


def _build(root: Path, kind: str, key: str, size: int, build: Callable[[Path], list[str]], what: str) -> Path:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(
            f"index cache folder {root} cannot be created ({e}); on read-only data set "
            "data.index_cache to a writable folder"
        ) from e
    final = root / f"{kind}-{key}-{size}"
    tmp = root / f".tmp-{kind}-{key}-{size}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    t0 = time.perf_counter()
    try:
        names = build(tmp)
        (tmp / "meta.json").write_text(json.dumps({"arrays": names, "what": what, "size": size}) + "\n")
        _fsync_folder(tmp)
        os.rename(tmp, final)  # the entry appears complete or not at all
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if (final / "meta.json").is_file():  # another builder (another job) won the race
            log.info("index cache: %s appeared while building; using it", final)
            return final
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_folder(root)
    nbytes = sum(f.stat().st_size for f in final.iterdir())
    log.info(
        "index cache: built %s in %.2f s (%.1f MB, %s)", final, time.perf_counter() - t0, nbytes / 1e6, what
    )
    return final


def _wait(cache: IndexCache, root: Path, kind: str, key: str, need: int, what: str) -> Path:
    t0 = last = time.monotonic()
    while True:
        found = find_entry(root, kind, key, need)
        if found is not None:
            log.info(
                "index cache: reused %s after waiting %.1f s for %s (%s)",
                found,
                time.monotonic() - t0,
                cache.who,
                what,
            )
            return found
        now = time.monotonic()
        if now - t0 > cache.timeout_s:
            raise TimeoutError(
                f"waited {cache.timeout_s:.0f} s for the sample index {root}/{kind}-{key}-* ({what}) that "
                f"{cache.who} builds, and it did not appear: did that rank fail, or does it see another "
                "folder? On a filesystem that is not shared between nodes set data.index_cache_shared="
                "false (local rank 0 of each node builds); raise data.index_cache_timeout_s for slow builds"
            )
        if now - last > 30:
            log.info("index cache: still waiting for %s to build %s (%.0f s)", cache.who, what, now - t0)
            last = now
        time.sleep(_POLL_S)


def _fsync_folder(path: Path) -> None:
    for f in [*path.iterdir(), path] if path.is_dir() else [path]:
        try:
            fd = os.open(f, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass  # some filesystems refuse fsync on folders
        finally:
            os.close(fd)


class NpyWriter:
    """A 1-D `.npy` file written chunk by chunk (its length unknown until `close`), so a builder's
    memory is one chunk, not the array."""

    def __init__(self, path: Path, dtype):
        self.path, self.dtype, self.length = path, np.dtype(dtype), 0
        self._f = open(path, "wb")  # noqa: SIM115 (closed in close)
        self._f.write(b"\0" * _HEADER_BYTES)

    def append(self, chunk: np.ndarray) -> None:
        self._f.write(np.ascontiguousarray(chunk, dtype=self.dtype).tobytes())
        self.length += len(chunk)

    def close(self) -> None:
        d = f"{{'descr': '{self.dtype.str}', 'fortran_order': False, 'shape': ({self.length},), }}"
        pad = _HEADER_BYTES - 10 - len(d) - 1
        self._f.seek(0)
        self._f.write(
            b"\x93NUMPY\x01\x00" + struct.pack("<H", _HEADER_BYTES - 10) + (d + " " * pad + "\n").encode()
        )
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
