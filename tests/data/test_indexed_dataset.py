import struct

import numpy as np
import pytest

from megaqwen.data.indexed import IndexedDataset, IndexedDatasetBuilder

DOCS = [[5, 6, 151643], [151643], [1, 2, 3, 4, 151643], []]


def _write(prefix, docs=DOCS, dtype=np.int32):
    with IndexedDatasetBuilder(prefix, dtype=dtype) as b:
        for d in docs:
            b.add_document(d)
    return prefix


def test_round_trip(tmp_path):
    ds = IndexedDataset(_write(tmp_path / "s"))
    assert len(ds) == 4 and ds.num_documents == 4 and ds.num_tokens == 9 and ds.dtype == np.int32
    assert [ds[i].tolist() for i in range(4)] == DOCS
    assert ds.sizes.tolist() == [3, 1, 5, 0]
    assert ds.get(2, offset=1, length=3).tolist() == [2, 3, 4]
    assert ds.get(2, offset=3).tolist() == [4, 151643]
    with pytest.raises(IndexError):
        ds.get(0, offset=2, length=5)


def test_bytes_match_megatron_layout(tmp_path):
    # Layout of Megatron-LM megatron/core/datasets/indexed_dataset.py (_IndexWriter.write).
    _write(tmp_path / "s", [[7, 8, 9], [151643, 2]])
    expected_idx = (
        b"MMIDIDX\x00\x00"
        + struct.pack("<Q", 1)
        + struct.pack("<B", 4)  # version, int32 code
        + struct.pack("<Q", 2)
        + struct.pack("<Q", 3)  # sequences, document indices (docs + 1)
        + struct.pack("<2i", 3, 2)  # sizes
        + struct.pack("<2q", 0, 12)  # byte pointers
        + struct.pack("<3q", 0, 1, 2)
    )  # document indices
    assert (tmp_path / "s.idx").read_bytes() == expected_idx
    assert (tmp_path / "s.bin").read_bytes() == struct.pack("<5i", 7, 8, 9, 151643, 2)


def test_reads_a_megatron_shard_with_multi_sequence_documents(tmp_path):
    # uint16 tokens (code 8), document 0 made of two sequences: document_indices [0, 2, 3].
    sizes, toks = [2, 3, 2], [1, 2, 3, 4, 5, 7, 8]
    idx = (
        b"MMIDIDX\x00\x00"
        + struct.pack("<QBQQ", 1, 8, 3, 3)
        + struct.pack("<3i", *sizes)
        + struct.pack("<3q", 0, 4, 10)
        + struct.pack("<3q", 0, 2, 3)
    )
    (tmp_path / "m.idx").write_bytes(idx)
    (tmp_path / "m.bin").write_bytes(struct.pack("<7H", *toks))
    ds = IndexedDataset(tmp_path / "m")
    assert ds.dtype == np.uint16 and ds.num_documents == 2 and ds.document_indices.tolist() == [0, 2, 3]
    assert [ds[i].tolist() for i in range(3)] == [[1, 2], [3, 4, 5], [7, 8]]


def test_megatron_core_reads_ours_and_we_read_theirs(tmp_path):
    mcore = pytest.importorskip(
        "megatron.core.datasets.indexed_dataset",
        reason="optional interop check: megatron-core is not installed",
    )
    torch = pytest.importorskip("torch")
    _write(tmp_path / "ours")
    theirs = mcore.IndexedDataset(str(tmp_path / "ours"))
    assert [theirs[i].tolist() for i in range(len(DOCS))] == DOCS
    b = mcore.IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.int32)
    for d in DOCS:
        b.add_document(torch.tensor(d, dtype=torch.int64), [len(d)])
    b.finalize(str(tmp_path / "theirs.idx"))
    assert (tmp_path / "theirs.idx").read_bytes() == (tmp_path / "ours.idx").read_bytes()
    assert (tmp_path / "theirs.bin").read_bytes() == (tmp_path / "ours.bin").read_bytes()


def test_crash_leaves_no_shard(tmp_path):
    with pytest.raises(RuntimeError), IndexedDatasetBuilder(tmp_path / "s") as b:
        b.add_document([1, 2])
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_token_ids_must_fit_dtype(tmp_path):
    with (
        pytest.raises(ValueError, match="do not fit uint16"),
        IndexedDatasetBuilder(tmp_path / "s", np.uint16) as b,
    ):
        b.add_document([151643])


@pytest.mark.parametrize(
    "corrupt, error, match",
    [
        (lambda p: p.with_suffix(".bin").unlink(), FileNotFoundError, r"s\.bin does not exist"),
        (lambda p: p.with_suffix(".idx").unlink(), FileNotFoundError, r"s\.idx does not exist"),
        (lambda p: _patch(p.with_suffix(".idx"), 0, b"NOTANIDX\x00"), ValueError, r"s\.idx: bad magic"),
        (
            lambda p: _patch(p.with_suffix(".idx"), 9, struct.pack("<Q", 2)),
            ValueError,
            "unsupported index version 2",
        ),
        (lambda p: _patch(p.with_suffix(".idx"), 17, b"\x09"), ValueError, "unsupported dtype code 9"),
        (lambda p: _truncate(p.with_suffix(".bin"), 30), ValueError, r"s\.bin: truncated data \(30 bytes"),
        (lambda p: _truncate(p.with_suffix(".idx"), 60), ValueError, r"s\.idx: truncated index \(60 bytes"),
        (lambda p: _truncate(p.with_suffix(".idx"), 10), ValueError, r"s\.idx: truncated index \(10 bytes"),
    ],
)
def test_corruption_errors_name_the_file(tmp_path, corrupt, error, match):
    prefix = _write(tmp_path / "s")
    corrupt(prefix)
    with pytest.raises(error, match=match):
        IndexedDataset(prefix)


def _patch(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def _truncate(path, size):
    path.write_bytes(path.read_bytes()[:size])
