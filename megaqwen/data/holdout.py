"""A held-out split by whole documents, for the validation loss when no separate shard is given.

Document i of a shard is held out when u_i < fraction, with u = default_rng(HOLDOUT_SEED).random(n):
a fixed seed (not train.seed, so changing the training seed never moves documents between the two
sides), and prefix-stable (u_i does not depend on n, so documents appended to a shard keep their side).
`DocumentSubset` presents the chosen documents to `GPTDataset` as a shard of their own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megaqwen.data.indexed import IndexedDataset

HOLDOUT_SEED = 20_240_601


class DocumentSubset:
    """Documents `ids` of a shard, renumbered 0..len-1: the part of IndexedDataset GPTDataset reads."""

    def __init__(self, indexed: IndexedDataset, ids: np.ndarray, tag: str):
        self.indexed, self.ids = indexed, ids
        self.prefix = Path(f"{indexed.prefix}[{tag}]")  # for error messages
        self.sizes = indexed.sizes[ids]
        self.data_format = getattr(indexed, "data_format", "text")
        self.selection: str | None = None  # what chose `ids`, for the index cache's key (None: hash them)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        return self.indexed.get(int(self.ids[i]), offset, length)

    def get_mask(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        return self.indexed.get_mask(int(self.ids[i]), offset, length)


def split_documents(indexed: IndexedDataset, fraction: float, held_out: bool) -> DocumentSubset:
    """The held-out documents (held_out=True) or the training ones of `indexed`. A dpo shard is split
    by pairs (documents 2i and 2i+1 stay on one side, u drawn per pair)."""
    if getattr(indexed, "data_format", "text") == "dpo":
        u = np.repeat(np.random.default_rng(HOLDOUT_SEED).random(len(indexed) // 2), 2)
    else:
        u = np.random.default_rng(HOLDOUT_SEED).random(len(indexed))
    mask = u < fraction
    if fraction > 0 and not mask.any():
        raise ValueError(f"{indexed.prefix}: data.valid_fraction={fraction} of {len(indexed)} documents "
                         "holds out none; raise it or give data.valid_path")
    subset = (DocumentSubset(indexed, np.flatnonzero(mask), "held-out") if held_out
              else DocumentSubset(indexed, np.flatnonzero(~mask), "train"))
    subset.selection = f"holdout seed={HOLDOUT_SEED} fraction={fraction!r} held_out={held_out}"  # cache key
    return subset
