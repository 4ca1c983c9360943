import numpy as np
import pytest
import torch

from megaqwen.data import GPTDataset, IndexedDataset, IndexedDatasetBuilder, build_dataset, packing_features

EOD = 151643


def make_shard(prefix, n_docs=23, seed=0, max_len=17):
    """Documents of odd lengths whose tokens encode (document, position) so windows can be checked."""
    rng = np.random.default_rng(seed)
    docs = []
    with IndexedDatasetBuilder(prefix) as b:
        for d in range(n_docs):
            body = [1000 * (d + 1) + k for k in range(int(rng.integers(0, max_len)))]
            docs.append(body + [EOD])
            b.add_document(docs[-1])
    return IndexedDataset(prefix), docs


def test_features_on_a_known_window():
    f = packing_features(np.array([7, 8, EOD, 5, EOD, EOD, 1, 2, 3]))  # T = 8
    assert f["tokens"].tolist() == [7, 8, EOD, 5, EOD, EOD, 1, 2]
    assert f["labels"].tolist() == [8, EOD, 5, EOD, EOD, 1, 2, 3]
    assert f["position_ids"].tolist() == [0, 1, 2, 0, 1, 0, 0, 1]
    assert f["document_ids"].tolist() == [0, 0, 0, 1, 1, 2, 3, 3]
    assert all(v.dtype == torch.int64 and v.shape == (8,) for v in f.values())
    g = packing_features(
        np.array([7, 8, EOD, 5, EOD]),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=True,
    )
    assert g["position_ids"].tolist() == [0, 1, 2, 3] and g["document_ids"].tolist() == [0, 0, 0, 0]
    assert g["labels"].tolist() == [8, EOD, -100, EOD]


def test_samples_tile_the_shuffled_stream(tmp_path):
    ds_idx, docs = make_shard(tmp_path / "s")
    seq, n = 9, 40  # several epochs of a 23-document shard
    ds = GPTDataset(ds_idx, seq, n, seed=3)
    assert ds.num_epochs > 1
    stream = np.concatenate([docs[d] for d in ds.doc_order])
    seen = set()
    for i in range(n):
        s = ds[i]
        w = int(ds.sample_order[i])
        seen.add(w)
        assert s["tokens"].tolist() == stream[w * seq : (w + 1) * seq].tolist()
        assert s["labels"].tolist() == stream[w * seq + 1 : (w + 1) * seq + 1].tolist()
        toks = s["tokens"].tolist()
        for t in range(1, seq):  # positions and document ids follow the EODs
            after_eod = toks[t - 1] == EOD
            assert s["position_ids"][t] == (0 if after_eod else s["position_ids"][t - 1] + 1)
            assert s["document_ids"][t] == s["document_ids"][t - 1] + after_eod
    assert len(seen) == n  # distinct windows
    # every epoch is a permutation of all documents
    for e in range(ds.num_epochs):
        assert sorted(ds.doc_order[e * len(docs) : (e + 1) * len(docs)].tolist()) == list(range(len(docs)))


def test_deterministic_and_prefix_stable(tmp_path):
    _, _ = make_shard(tmp_path / "s")
    a = build_dataset(str(tmp_path / "s"), seq_len=8, num_samples=30, seed=7)
    b = build_dataset(str(tmp_path / "s"), seq_len=8, num_samples=30, seed=7)
    longer = build_dataset(str(tmp_path / "s"), seq_len=8, num_samples=75, seed=7)
    other = build_dataset(str(tmp_path / "s"), seq_len=8, num_samples=30, seed=8)
    for i in range(30):
        assert torch.equal(a[i]["tokens"], b[i]["tokens"]) and torch.equal(
            a[i]["tokens"], longer[i]["tokens"]
        )
    assert any(not torch.equal(a[i]["tokens"], other[i]["tokens"]) for i in range(30))
    with pytest.raises(IndexError):
        a[30]


def test_empty_shard_is_an_error(tmp_path):
    with IndexedDatasetBuilder(tmp_path / "e"):
        pass
    with pytest.raises(ValueError, match="no tokens"):
        GPTDataset(IndexedDataset(tmp_path / "e"), 8, 4)
