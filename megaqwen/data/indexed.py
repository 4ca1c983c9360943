"""Megatron-LM compatible memory-mapped token shards: `PREFIX.bin` + `PREFIX.idx`.

`.bin` holds the token ids of every sequence back to back (no header). `.idx` layout, all
little-endian (Megatron-LM `megatron/core/datasets/indexed_dataset.py`, `_IndexWriter`):

    offset  size           field
    0       9              magic b"MMIDIDX\\x00\\x00"
    9       8   u64        version = 1
    17      1   u8         dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64,
                           7 float32, 8 uint16)
    18      8   u64        S = sequence count
    26      8   u64        D = document-index count (documents + 1: it starts with a 0)
    34      4*S int32      sequence lengths in tokens
    ..      8*S int64      sequence byte offsets into .bin
    ..      8*D int64      document indices: sequence index where each document ends (cumulative)

We write one sequence per document (as Megatron's `preprocess_data.py` does without sentence
splitting), so `document_indices == [0, 1, ..., S]`. Token ids are int32 by default: Qwen's
151,665 ids do not fit uint16.

Beside the two Megatron files our builder writes `PREFIX.shard.json` (`read_meta`): the smallest and
largest token id, counts, and what the caller passes (`megaqwen.data.tokenize`: the tokenizer that
made the shard). Megatron ignores it; shards without it (made by Megatron's tools) still load, and
the trainer then checks their ids by scanning (`max_token_id`) and cannot check their tokenizer.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = 34  # 9 magic + 8 version + 1 dtype code + 8 sequence count + 8 document count
DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
META_FORMAT = 1  # version of PREFIX.shard.json
# `max_token_id` of a shard without a sidecar: read all of it up to FULL_SCAN_TOKENS (64M tokens,
# 256 MiB of int32: about 0.1 s from the page cache); above that SAMPLE_WINDOWS evenly spaced windows
# of SAMPLE_WINDOW_TOKENS (16M tokens in all), which finds a wrong tokenizer (its ids are everywhere)
# but may miss a few stray ids. Our own shards record the exact maximum instead.
FULL_SCAN_TOKENS = 1 << 26
SAMPLE_WINDOWS, SAMPLE_WINDOW_TOKENS = 256, 1 << 16


def idx_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


def bin_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def meta_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.shard.json")


def exists(prefix: str | Path) -> bool:
    return idx_path(prefix).is_file() and bin_path(prefix).is_file()


class IndexedDatasetBuilder:
    """Streams documents into `PREFIX.bin`/`.idx`; nothing appears at PREFIX until `finalize()`.

    Both files are written under temporary names and renamed at the end (.bin first, then .idx), so
    a crash leaves either no shard or the previous complete one, never a half-written shard that
    readers would accept. Use as a context manager to remove the temporaries on error. `meta` (JSON
    values) goes into PREFIX.shard.json with the id range and counts; a previous shard's sidecar is
    removed before the new .bin/.idx appear, so a sidecar never describes another shard.
    """

    def __init__(self, prefix: str | Path, dtype: type[np.number] | np.dtype = np.int32,
                 meta: dict | None = None):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        self.meta = dict(meta or {})
        self.min_token_id: int | None = None
        self.max_token_id: int | None = None
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(
                f"{self.prefix}: unsupported token dtype {self.dtype}, use one of "
                f"{sorted(str(d) for d in CODE_OF_DTYPE)}"
            )
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        suffix = f".tmp.{os.getpid()}"
        self._tmp_bin = Path(f"{bin_path(prefix)}{suffix}")
        self._tmp_idx = Path(f"{idx_path(prefix)}{suffix}")
        self._tmp_meta = Path(f"{meta_path(prefix)}{suffix}")
        self._bin = open(self._tmp_bin, "wb")  # noqa: SIM115 (closed in finalize/abort)
        self._lengths: list[int] = []
        self._info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
        self.num_tokens = 0

    def add_document(self, tokens) -> None:
        """Append one document (any 1-D int sequence; the caller adds the EOD token if wanted)."""
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"{self.prefix}: a document must be 1-D, got shape {arr.shape}")
        if arr.size:
            lo, hi = arr.min().item(), arr.max().item()
            if self._info is not None and (lo < self._info.min or hi > self._info.max):
                raise ValueError(f"{self.prefix}: token ids in [{lo}, {hi}] do not fit {self.dtype}")
            self.min_token_id = lo if self.min_token_id is None else min(self.min_token_id, lo)
            self.max_token_id = hi if self.max_token_id is None else max(self.max_token_id, hi)
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes(order="C"))
        self._lengths.append(int(arr.size))
        self.num_tokens += int(arr.size)

    def finalize(self) -> None:
        self._bin.close()
        n = len(self._lengths)
        write_index(self._tmp_idx, np.asarray(self._lengths, dtype=np.int32), self.dtype)
        meta = {"format": META_FORMAT, **self.meta, "dtype": str(self.dtype), "num_documents": n,
                "num_tokens": self.num_tokens, "min_token_id": self.min_token_id,
                "max_token_id": self.max_token_id}
        self._tmp_meta.write_text(json.dumps(meta, indent=1) + "\n")
        meta_path(self.prefix).unlink(missing_ok=True)
        os.replace(self._tmp_bin, bin_path(self.prefix))
        os.replace(self._tmp_idx, idx_path(self.prefix))
        os.replace(self._tmp_meta, meta_path(self.prefix))

    def abort(self) -> None:
        self._bin.close()
        for p in (self._tmp_bin, self._tmp_idx, self._tmp_meta):
            p.unlink(missing_ok=True)

    def __enter__(self) -> IndexedDatasetBuilder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


def write_index(path: str | Path, lengths: np.ndarray, dtype) -> None:
    """A Megatron .idx at `path` for documents of `lengths` tokens of `dtype`, stored back to back."""
    n, dtype = len(lengths), np.dtype(dtype)
    pointers = np.zeros(n, dtype=np.int64)
    np.cumsum(lengths[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", CODE_OF_DTYPE[dtype]))
        f.write(struct.pack("<Q", n))
        f.write(struct.pack("<Q", n + 1))
        f.write(np.asarray(lengths).astype("<i4").tobytes())
        f.write(pointers.astype("<i8").tobytes())
        f.write(np.arange(n + 1, dtype="<i8").tobytes())
        f.flush()
        os.fsync(f.fileno())


class IndexedDataset:
    """Read-only view of a shard: `ds[i]` is sequence i as a numpy view into the mmapped .bin."""

    def __init__(self, prefix: str | Path):
        self.prefix = Path(prefix)
        ipath, bpath = idx_path(prefix), bin_path(prefix)
        for p in (ipath, bpath):
            if not p.is_file():
                raise FileNotFoundError(f"indexed dataset file {p} does not exist (prefix {self.prefix})")
        idx = np.memmap(ipath, dtype=np.uint8, mode="r") if ipath.stat().st_size else np.zeros(0, np.uint8)
        if idx.size < HEADER_BYTES:
            raise ValueError(
                f"{ipath}: truncated index ({idx.size} bytes, the header alone is {HEADER_BYTES})"
            )
        if bytes(idx[:9]) != MAGIC:
            raise ValueError(
                f"{ipath}: bad magic {bytes(idx[:9])!r}, expected {MAGIC!r} (not a Megatron .idx)"
            )
        version, code = struct.unpack("<QB", bytes(idx[9:18]))
        if version != VERSION:
            raise ValueError(f"{ipath}: unsupported index version {version}, only {VERSION} is known")
        if code not in DTYPE_CODES:
            raise ValueError(f"{ipath}: unsupported dtype code {code}, known {sorted(DTYPE_CODES)}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        n, d = struct.unpack("<QQ", bytes(idx[18:HEADER_BYTES]))
        need = HEADER_BYTES + 4 * n + 8 * n + 8 * d
        if idx.size < need:
            raise ValueError(
                f"{ipath}: truncated index ({idx.size} bytes, header says {n} sequences and "
                f"{d} document indices, which need {need})"
            )
        off = HEADER_BYTES
        self.sizes = np.frombuffer(idx, dtype="<i4", count=n, offset=off)  # tokens per sequence
        self.pointers = np.frombuffer(idx, dtype="<i8", count=n, offset=off + 4 * n)  # byte offsets
        self.document_indices = np.frombuffer(idx, dtype="<i8", count=d, offset=off + 12 * n)
        self._idx = idx
        # sequences lie back to back (Megatron's writer and ours): the last one ends the data. O(1), not a
        # pass over the sizes (36 GB of them for 9B documents) in every rank at every start
        data_bytes = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if n else 0
        bin_size = bpath.stat().st_size
        if bin_size < data_bytes:
            raise ValueError(f"{bpath}: truncated data ({bin_size} bytes, the index needs {data_bytes})")
        # np.memmap cannot map an empty file; an empty shard is still a valid dataset.
        self._bin = np.memmap(bpath, dtype=self.dtype, mode="r") if bin_size else np.zeros(0, self.dtype)
        self.data_format, self.mask = _chat_mask(self)

    def get_mask(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """The uint8 loss mask of tokens [offset, offset + length) of sequence i (sft / dpo shards)."""
        if self.mask is None:
            raise ValueError(f"{self.prefix} is a {self.data_format} shard: it has no loss mask")
        return self.mask.get(i, offset, length)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence i (to its end when length is None)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"{self.prefix}: sequence {i} out of range for {len(self)} sequences")
        size = int(self.sizes[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(
                f"{self.prefix}: slice [{offset}, {offset + length}) outside sequence {i} of {size} tokens"
            )
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        return self._bin[start : start + length]

    @property
    def num_documents(self) -> int:
        return max(len(self.document_indices) - 1, 0)

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))


def _chat_mask(ds: IndexedDataset) -> tuple[str, IndexedDataset | None]:
    """(data_format, mask shard) of a shard: "text" and None unless PREFIX.shard.json says "sft" or "dpo"
    (`megaqwen.data.chat`), whose per-token uint8 loss mask is the parallel shard `mask_prefix`."""
    try:
        meta = read_meta(ds.prefix) or {}
    except ValueError:
        return "text", None  # a damaged sidecar: the trainer's pre-flight names it
    fmt = meta.get("data_format", "text")
    if fmt == "text":
        return fmt, None
    mask_prefix = ds.prefix.parent / str(meta.get("mask_prefix", f"{ds.prefix.name}.mask"))
    if not exists(mask_prefix):
        raise FileNotFoundError(f"{ds.prefix} is a {fmt} shard but its loss mask {mask_prefix}.bin/.idx is "
                                "missing; re-tokenise it (megaqwen-data tokenize --format " + fmt + ")")
    mask = IndexedDataset(mask_prefix)
    if not np.array_equal(mask.sizes, ds.sizes):
        raise ValueError(f"{ds.prefix}: its loss mask {mask_prefix} has other document sizes than the "
                         "tokens; re-tokenise it")
    return fmt, mask


def read_meta(prefix: str | Path) -> dict | None:
    """PREFIX.shard.json (None when the shard has none, e.g. one made by Megatron's tools)."""
    path = meta_path(prefix)
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); re-tokenise the shard, or delete the file "
                         "(the shard then loads with its tokenizer unchecked)") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}; re-tokenise the "
                         "shard or delete the file")
    return meta


def max_token_id(prefix: str | Path) -> tuple[int | None, str]:
    """(largest token id, how it was found) of a shard: from its sidecar, else by reading the .bin
    (all of it up to FULL_SCAN_TOKENS, evenly spaced windows above). None for an empty shard."""
    meta = read_meta(prefix)
    if meta is not None and "max_token_id" in meta:
        value = meta["max_token_id"]
        return (None if value is None else int(value)), f"recorded in {meta_path(prefix).name}"
    ds = IndexedDataset(prefix)
    n = ds.num_tokens
    if n == 0:
        return None, "empty shard"
    flat = ds._bin[:n]  # Megatron writes sequences back to back from byte 0
    if n <= FULL_SCAN_TOKENS:
        return int(flat.max()), f"read all {n:,} tokens"
    starts = np.linspace(0, n - SAMPLE_WINDOW_TOKENS, SAMPLE_WINDOWS).astype(np.int64)
    top = max(int(flat[s : s + SAMPLE_WINDOW_TOKENS].max()) for s in starts)
    return top, (f"read {SAMPLE_WINDOWS * SAMPLE_WINDOW_TOKENS:,} of {n:,} tokens in {SAMPLE_WINDOWS} "
                 f"windows: the shard has no {meta_path(prefix).name}")
