"""The trainer's reading of chat shards: sft labels are exactly the assistant tokens and never cross
examples; dpo rows are whole (chosen, rejected) pairs in every micro-batch; epochs and resume."""

import json

import numpy as np
import pytest
import torch

from megaqwen.data.blend import build_dataset
from megaqwen.data.dataset import GPTDataset
from megaqwen.data.holdout import split_documents
from megaqwen.data.indexed import IndexedDataset, IndexedDatasetBuilder
from megaqwen.data.pairs import PairDataset, row_features
from megaqwen.data.sampler import BatchIterator

EOD = 9


def _chat_shard(prefix, docs, fmt="sft"):
    """A hand-built chat shard: docs are (tokens, mask) lists, written as megaqwen.data.chat does."""
    meta = {"data_format": fmt, "mask_prefix": f"{prefix.name}.mask"}
    with IndexedDatasetBuilder(prefix, meta=meta) as t, \
            IndexedDatasetBuilder(f"{prefix}.mask", dtype=np.uint8) as m:
        for ids, mask in docs:
            t.add_document(ids)
            m.add_document(mask)
    return prefix


# example = header (mask 0) + answer (mask 1) + EOD (mask 0); answers use ids >= 100
EXAMPLES = [([1, 2, 3, 101, 102, EOD], [0, 0, 0, 1, 1, 0]),
            ([1, 4, 103, EOD], [0, 0, 1, 0]),
            ([1, 5, 6, 7, 104, 105, 106, EOD], [0, 0, 0, 0, 1, 1, 1, 0])]


def test_sft_labels_are_exactly_the_assistant_tokens_and_never_cross_examples(tmp_path):
    prefix = _chat_shard(tmp_path / "sft", EXAMPLES)
    total = sum(len(t) for t, _ in EXAMPLES)  # 18 tokens: one unshuffled window covers all
    ds = GPTDataset(IndexedDataset(prefix), seq_len=total - 1, num_samples=1, shuffle=False, eod_id=EOD)
    s = ds[0]
    # hand-built: label i is token i+1 where token i+1 is an assistant token, else -100
    want = [-100, -100, 101, 102, -100, -100, -100, 103, -100, -100, -100, -100, -100, 104, 105, 106, -100]
    assert s["labels"].tolist() == want
    assert s["document_ids"].tolist() == [0] * 6 + [1] * 4 + [2] * 7
    assert s["position_ids"].tolist() == list(range(6)) + list(range(4)) + list(range(7))
    trained = s["labels"] != -100
    # every trained label's target is in the same example as its input (no prediction across examples)
    assert (s["tokens"][trained] != EOD).all()


def test_packed_sft_labels_never_cross_documents_over_many_windows(tmp_path):
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(40):
        head, body = int(rng.integers(1, 6)), int(rng.integers(1, 8))
        ids = [1] * head + list(100 + rng.integers(0, 50, body)) + [EOD]
        docs.append((ids, [0] * head + [1] * body + [0]))
    ix = IndexedDataset(_chat_shard(tmp_path / "sft", docs))
    ds = GPTDataset(ix, seq_len=13, num_samples=60, eod_id=EOD)
    for i in range(len(ds)):
        s = ds[i]
        trained = s["labels"] != -100
        assert (s["labels"][trained] >= 100).all()  # only assistant ids are ever targets
        assert (s["tokens"][trained] != EOD).all()
        # a trained target's document is its input's: document_ids only change after an EOD input
        nxt = torch.cat([s["document_ids"][1:], s["document_ids"][-1:]])
        assert (nxt[trained] == s["document_ids"][trained]).all()


def _pairs(prefix, n):
    docs = []
    for p in range(n):
        prompt = [1, 2, 3 + p]
        for resp in ([100 + p, 150], [200 + p]):  # chosen, rejected
            docs.append((prompt + resp + [EOD], [0] * 3 + [1] * len(resp) + [0]))
    return _chat_shard(prefix, docs, "dpo")


@pytest.mark.parametrize("dp_size", [1, 2])
def test_dpo_rows_are_pairs_in_every_micro_batch(tmp_path, dp_size):
    ds = build_dataset(str(_pairs(tmp_path / "dpo", 7)), seq_len=8, num_samples=32, seed=3)
    assert isinstance(ds, PairDataset)
    seen = []
    for rank in range(dp_size):
        for b in BatchIterator(ds, global_batch_size=8, micro_batch_size=2, dp_rank=rank, dp_size=dp_size):
            chosen, rejected = b["labels"][0], b["labels"][1]
            c, r = chosen[chosen != -100].tolist(), rejected[rejected != -100].tolist()
            assert c[0] - 100 == r[0] - 200 and c[1] == 150 and len(r) == 1  # one pair, chosen first
            assert torch.equal(b["tokens"][0][:3], b["tokens"][1][:3])  # same prompt
            seen.append(c[0] - 100)
    assert sorted(seen[:7]) == list(range(7)) if dp_size == 1 else len(seen) == 16  # an epoch is a shuffle
    with pytest.raises(ValueError, match="a micro-batch of 3 rows is odd"):
        BatchIterator(ds, global_batch_size=6, micro_batch_size=3)


def test_dpo_row_padding_and_truncation():
    tokens, mask = np.array([1, 2, 3, 4, 5, 100, 101, EOD]), np.array([0, 0, 0, 0, 0, 1, 1, 0])
    padded = row_features(tokens, mask, seq_len=10, eod_id=EOD)
    assert padded["labels"].tolist() == [-100] * 4 + [100, 101] + [-100] * 4
    assert padded["document_ids"].tolist() == [0] * 7 + [1] * 3
    # too long: the prompt loses tokens from the left, keeping its last one before the response
    cut = row_features(tokens, mask, seq_len=3, eod_id=EOD)
    assert cut["tokens"].tolist() == [5, 100, 101] and cut["labels"].tolist() == [100, 101, -100]
    # the response alone is too long: it loses tokens from the right
    short = row_features(tokens, mask, seq_len=2, eod_id=EOD)
    assert short["tokens"].tolist() == [5, 100] and short["labels"].tolist() == [100, 101]


def test_dpo_holdout_keeps_pairs_together_and_blends_are_refused(tmp_path):
    ix = IndexedDataset(_pairs(tmp_path / "dpo", 50))
    held = split_documents(ix, 0.3, held_out=True)
    assert len(held) % 2 == 0 and (held.ids[0::2] % 2 == 0).all()
    assert (held.ids[1::2] == held.ids[0::2] + 1).all()
    with pytest.raises(ValueError, match="cannot be blended"):
        build_dataset([str(tmp_path / "dpo"), str(tmp_path / "dpo")], seq_len=8, num_samples=4)


def test_epochs_cap_and_resume_from_consumed_samples(tmp_path):
    ix = IndexedDataset(_pairs(tmp_path / "dpo", 5))
    with pytest.raises(ValueError, match="train.epochs=2"):
        PairDataset(ix, 8, 22, epochs=2)
    ds = PairDataset(ix, 8, 20, seed=1, epochs=2)
    docs = [ds.document(i) for i in range(20)]
    assert sorted(docs[:10]) == sorted(docs[10:]) == list(range(10)) and docs[:10] != docs[10:]
    straight = [b["tokens"] for b in BatchIterator(ds, 4, 2)]
    resumed = [b["tokens"] for b in BatchIterator(ds, 4, 2, consumed_samples=8)]
    assert all(torch.equal(a, b) for a, b in zip(straight[4:], resumed, strict=True))
    sft = IndexedDataset(_chat_shard(tmp_path / "sft", EXAMPLES))  # 18 tokens: 2 epochs = 35 // 4 = 8
    GPTDataset(sft, 4, 8, epochs=2)
    with pytest.raises(ValueError, match="train.epochs=2"):
        GPTDataset(sft, 4, 9, epochs=2)


def test_shipped_chat_set_loads_with_masked_labels(tmp_path):
    from megaqwen.data.chat import tokenize_chat
    from megaqwen.data.tokenize import shipped_sample_corpus

    prefix = str(tmp_path / "chat")
    tokenize_chat([str(shipped_sample_corpus().parent / "chat.jsonl")], prefix)
    meta = json.loads((tmp_path / "chat.shard.json").read_text())
    ds = build_dataset(prefix, seq_len=64, num_samples=16)
    trained = sum(int((ds[i]["labels"] != -100).sum()) for i in range(16))
    assert meta["data_format"] == "sft" and 0 < trained < 16 * 64 // 2


def test_a_chat_shard_without_its_mask_is_refused(tmp_path):
    prefix = _chat_shard(tmp_path / "sft", EXAMPLES)
    (tmp_path / "sft.mask.idx").unlink()
    with pytest.raises(FileNotFoundError, match="loss mask .*sft.mask.bin/.idx is missing; re-tokenise"):
        IndexedDataset(prefix)
