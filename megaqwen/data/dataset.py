"""Packed pre-training samples over one indexed shard (Megatron `GPTDataset` semantics).

The shard's documents (each already ending in EOD) are laid end to end in a seeded random order
per epoch, forming one token stream. Sample w is the window of `seq_len + 1` tokens starting at
stream position `w * seq_len` (consecutive windows share one token, so no token is lost as a label).
Windows are shuffled inside blocks of one epoch's worth of samples (at most 2**22 windows), and only
the blocks a run samples from are built (the exact rule: `megaqwen.data.sample_order`).

Every permutation comes from `np.random.default_rng([seed, kind, block])` (or a keyed Feistel
permutation for documents of shards above 2**22 documents), so the order of the first k samples
never depends on how many samples were requested: extending a run (more steps) keeps everything
already seen, and a resumed run rebuilds exactly the same order. With `cache` (`index_cache`) the
arrays are built once, by one process, and memory-mapped by every rank.

Sample tensors, all int64 of length T = seq_len:
    tokens        stream[w*T : w*T + T]
    labels        stream[w*T + 1 : w*T + T + 1]   (already shifted; -100 where masked)
    position_ids  0, 1, 2, ... restarting at 0 after each EOD (reset_position_ids)
    document_ids  0 for the first document in the sample, +1 after each EOD (reset_attention_mask),
                  for the block-diagonal causal mask of `kernels.attention.sdpa_attention`

An sft shard (`megaqwen.data.chat`: a loss mask per token) packs the same way; label i is -100 unless
the mask of its *target* token (i + 1 in the window) is 1, so only assistant tokens are trained. Every
example ends with an EOD whose mask is 0 and starts with a masked system/user header, so no example's
first token is ever predicted from the one before it, and its document_ids / position_ids restart.

`epochs` > 0 caps the samples at that many passes over the shard (ValueError beyond); each pass has
its own document shuffle already, and everything is a function of the sample index, so a resumed run
(consumed_samples) continues the same epochs.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from megaqwen.data import sample_order as order
from megaqwen.data.index_cache import IndexCache, cache_key, load_or_build
from megaqwen.data.indexed import IndexedDataset
from megaqwen.tokenizer import EOD_ID


def packing_features(
    window: np.ndarray,
    eod_id: int = EOD_ID,
    reset_position_ids: bool = True,
    reset_attention_mask: bool = True,
    eod_mask_loss: bool = False,
    loss_mask: np.ndarray | None = None,
) -> dict[str, torch.Tensor]:
    """(T+1,) token window -> tokens, labels, position_ids, document_ids, each (T,) int64.
    `loss_mask` (T+1,): labels whose target token has mask 0 become -100."""
    window = np.asarray(window, dtype=np.int64)
    tokens, labels = window[:-1], window[1:].copy()
    if loss_mask is not None:
        labels[np.asarray(loss_mask[1:]) == 0] = -100
    t = len(tokens)
    is_eod = tokens == eod_id
    # doc_T[i] = number of EODs strictly before position i: the EOD belongs to the document it closes.
    doc_T = np.zeros(t, dtype=np.int64)
    np.cumsum(is_eod[:-1], out=doc_T[1:])
    if reset_position_ids:
        starts = np.flatnonzero(np.r_[True, is_eod[:-1]])  # first position of each document
        pos_T = np.arange(t, dtype=np.int64) - starts[doc_T]
    else:
        pos_T = np.arange(t, dtype=np.int64)
    if not reset_attention_mask:
        doc_T = np.zeros(t, dtype=np.int64)
    if eod_mask_loss:
        labels[is_eod] = -100  # do not train EOD -> first token of an unrelated document
    return {
        "tokens": torch.from_numpy(tokens.copy()),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(pos_T),
        "document_ids": torch.from_numpy(doc_T),
    }


class GPTDataset(torch.utils.data.Dataset):
    """`num_samples` packed samples of `seq_len` tokens from one shard, repeating epochs as needed."""

    def __init__(
        self,
        indexed: IndexedDataset,
        seq_len: int,
        num_samples: int,
        seed: int = 1234,
        *,
        shuffle: bool = True,
        eod_id: int = EOD_ID,
        reset_position_ids: bool = True,
        reset_attention_mask: bool = True,
        eod_mask_loss: bool = False,
        epochs: int = 0,
        cache: IndexCache | None = None,
    ):
        if seq_len < 1 or num_samples < 0:
            raise ValueError(
                f"{indexed.prefix}: need seq_len >= 1 and num_samples >= 0, got {seq_len}, {num_samples}"
            )
        self.indexed, self.seq_len, self.num_samples, self.seed = indexed, seq_len, num_samples, seed
        self.features = dict(
            eod_id=eod_id,
            reset_position_ids=reset_position_ids,
            reset_attention_mask=reset_attention_mask,
            eod_mask_loss=eod_mask_loss,
        )
        fmt = getattr(indexed, "data_format", "text")
        if fmt not in ("text", "sft"):
            raise ValueError(f"{indexed.prefix} is a {fmt} shard: it is read as pairs (PairDataset), "
                             "not packed")
        self.masked = fmt == "sft"
        n_docs, epoch_tokens = len(indexed), order.shard_tokens(indexed, cache)
        if epochs and num_samples > epochs_capacity(epoch_tokens, seq_len, epochs):
            raise ValueError(f"{indexed.prefix}: {num_samples} samples of {seq_len} tokens are more than "
                             f"train.epochs={epochs} passes over its {epoch_tokens} tokens hold "
                             f"({epochs_capacity(epoch_tokens, seq_len, epochs)})")
        if num_samples and epoch_tokens == 0:
            raise ValueError(
                f"{indexed.prefix}: the shard holds no tokens, cannot draw {num_samples} samples"
            )
        self.block = max(min(epoch_tokens // seq_len, order.MAX_BLOCK), 1)
        num_windows = math.ceil(num_samples / self.block) * self.block
        inputs = dict(order=order.ORDER_VERSION, shard=order.shard_identity(indexed), seq_len=seq_len,
                      seed=seed, shuffle=shuffle, max_block=order.MAX_BLOCK, max_docs=order.MAX_DOCS,
                      doc_chunk=order.DOC_CHUNK)
        plan = order.OrderPlan(indexed, n_docs, epoch_tokens, seq_len, num_windows, self.block, seed, shuffle)
        if cache is None:
            arrays = plan.build_in_memory()
        else:
            what = f"{indexed.prefix}: {num_windows:,} windows of {seq_len} tokens"
            arrays = load_or_build(cache, indexed.prefix, "gpt", cache_key(**inputs), num_windows,
                                   num_windows, plan.build_into, what)
        self.doc_order, self.doc_start = arrays["doc_order"], arrays["doc_start"]
        self.sample_order = arrays["sample_order"]
        self.num_epochs = -(-len(self.doc_order) // max(n_docs, 1))  # epochs the built order touches

    def __len__(self) -> int:
        return self.num_samples

    def window(self, i: int, read=None) -> np.ndarray:
        """The (seq_len + 1,) int64 token window of sample i (`read`: another per-document reader with
        `get`'s signature, e.g. the shard's `get_mask`)."""
        read = read or self.indexed.get
        if not 0 <= i < self.num_samples:
            raise IndexError(
                f"sample {i} out of range for {self.num_samples} samples of {self.indexed.prefix}"
            )
        start = int(self.sample_order[i]) * self.seq_len
        need, out, parts = self.seq_len + 1, 0, []
        j = int(np.searchsorted(self.doc_start, start, side="right")) - 1
        offset = start - int(self.doc_start[j])
        while out < need:
            doc = int(self.doc_order[j])
            take = min(int(self.indexed.sizes[doc]) - offset, need - out)
            parts.append(read(doc, offset, take))
            out, offset, j = out + take, 0, j + 1
        return np.concatenate(parts).astype(np.int64)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        mask = self.window(i, self.indexed.get_mask) if self.masked else None
        return packing_features(self.window(i), **self.features, loss_mask=mask)


def epochs_capacity(epoch_tokens: int, seq_len: int, epochs: int) -> int:
    """Packed samples of `seq_len` tokens that `epochs` passes over `epoch_tokens` tokens give."""
    return max((epochs * epoch_tokens - 1) // seq_len, 0)
