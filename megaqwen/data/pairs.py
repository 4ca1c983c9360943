"""Preference pairs from a dpo shard (`megaqwen.data.chat`): one document per row, no packing.

The shard holds each pair as documents 2p (chosen) and 2p+1 (rejected). Sample 2k is the chosen and
sample 2k+1 the rejected document of pair order[k], where order is a seeded permutation of the pairs
per epoch (`np.random.default_rng([seed, 2, epoch])`). `BatchIterator` refuses an odd micro-batch
size for this dataset (`check_pair_rows`, the check the dpo and reward objectives make too), and every
rank's slice starts at an even sample, so rows 2i and 2i+1 of every micro-batch are (chosen, rejected)
of one pair. The order is a function of the sample index alone, so
a run resumed from consumed_samples continues it exactly.

Row tensors, all int64 of length T = seq_len, from the document's tokens d and mask m (length L):
    tokens        d[:-1], then EOD padding
    labels        d[1:] where m[1:] == 1 (the response and its <|im_end|>), else -100; -100 on padding
    position_ids  0, 1, ..., T-1
    document_ids  0 on the document, 1 on the padding
A document longer than T + 1 tokens loses prompt tokens from the *left* first (keeping at least the
last prompt token, which predicts the first response token), then response tokens from the right.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from megaqwen.tokenizer import EOD_ID

_PAIRS = 2  # rng stream id (dataset.py uses 0 and 1)


def check_pair_rows(rows: int, what: str) -> None:
    """The one check that a micro-batch of `rows` rows holds whole (chosen, rejected) pairs (rows 2i
    and 2i + 1 of a pair must share a micro-batch); a ValueError starting with `what` (who reads the
    pairs: the dpo / reward objective, a dpo shard) otherwise."""
    if rows % 2:
        raise ValueError(f"{what}: a micro-batch of {rows} row{'s' * (rows != 1)} is odd, but rows come in "
                         "(chosen, rejected) pairs that must share a micro-batch: train.micro_batch_size "
                         f"must be even (got {rows}; use {rows + 1})")


def truncate(tokens: np.ndarray, mask: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """At most `keep` tokens of a document: prompt cut from the left, then the response from the right."""
    extra = len(tokens) - keep
    if extra <= 0:
        return tokens, mask
    trained = np.flatnonzero(mask)
    first = int(trained[0]) if len(trained) else len(tokens)
    cut = min(extra, max(first - 1, 0))
    return tokens[cut : cut + keep], mask[cut : cut + keep]


def row_features(tokens: np.ndarray, mask: np.ndarray, seq_len: int,
                 eod_id: int = EOD_ID) -> dict[str, torch.Tensor]:
    """One document -> tokens, labels, position_ids, document_ids, each (seq_len,) int64."""
    tokens, mask = truncate(np.asarray(tokens, np.int64), np.asarray(mask), seq_len + 1)
    n = len(tokens) - 1  # real positions
    tok_T = np.full(seq_len, eod_id, dtype=np.int64)
    lab_T = np.full(seq_len, -100, dtype=np.int64)
    tok_T[:n] = tokens[:-1]
    lab_T[:n] = np.where(mask[1:] == 1, tokens[1:], -100)
    doc_T = np.zeros(seq_len, dtype=np.int64)
    doc_T[n:] = 1
    return {
        "tokens": torch.from_numpy(tok_T),
        "labels": torch.from_numpy(lab_T),
        "position_ids": torch.arange(seq_len, dtype=torch.int64),
        "document_ids": torch.from_numpy(doc_T),
    }


class PairDataset(torch.utils.data.Dataset):
    """`num_samples` rows (2 per pair: chosen, rejected) of `seq_len` tokens from one dpo shard."""

    pair_rows = True  # BatchIterator: micro-batches must hold whole pairs

    def __init__(self, indexed, seq_len: int, num_samples: int, seed: int = 1234, *, shuffle: bool = True,
                 eod_id: int = EOD_ID, epochs: int = 0, **_packing):
        # (_packing: the packed-text options of GPTDataset, meaningless for one document per row)
        if getattr(indexed, "data_format", "text") != "dpo":
            raise ValueError(f"{indexed.prefix} is not a dpo shard (tokenise with --format dpo)")
        if seq_len < 1 or num_samples < 0 or num_samples % 2:
            raise ValueError(f"{indexed.prefix}: need seq_len >= 1 and an even num_samples >= 0, got "
                             f"{seq_len}, {num_samples}")
        if len(indexed) % 2:
            raise ValueError(f"{indexed.prefix}: {len(indexed)} documents, not whole (chosen, rejected) "
                             "pairs")
        self.indexed, self.seq_len, self.num_samples, self.eod_id = indexed, seq_len, num_samples, eod_id
        self.num_pairs = len(indexed) // 2
        if num_samples and not self.num_pairs:
            raise ValueError(f"{indexed.prefix}: the shard holds no pairs, cannot draw {num_samples} rows")
        if epochs and num_samples > 2 * epochs * self.num_pairs:
            raise ValueError(f"{indexed.prefix}: {num_samples} rows are more than train.epochs={epochs} "
                             f"passes over its {self.num_pairs} pairs hold ({2 * epochs * self.num_pairs})")
        num_epochs = math.ceil(num_samples / 2 / self.num_pairs) if num_samples else 0
        orders = [(np.random.default_rng([seed, _PAIRS, e]).permutation(self.num_pairs) if shuffle
                   else np.arange(self.num_pairs)) for e in range(num_epochs)]
        self.pair_order = np.concatenate(orders) if orders else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return self.num_samples

    def document(self, i: int) -> int:
        """The shard document of row i: 2p for a chosen row, 2p + 1 for a rejected one."""
        if not 0 <= i < self.num_samples:
            raise IndexError(f"row {i} out of range for {self.num_samples} rows of {self.indexed.prefix}")
        return 2 * int(self.pair_order[i // 2]) + i % 2

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        doc = self.document(i)
        return row_features(self.indexed.get(doc), self.indexed.get_mask(doc), self.seq_len, self.eod_id)
