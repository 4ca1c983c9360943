import pytest
import torch

from megaqwen.data import BatchIterator, IndexedDatasetBuilder, build_dataset

EOD = 151643


@pytest.fixture
def dataset(tmp_path):
    with IndexedDatasetBuilder(tmp_path / "s") as b:
        for d in range(40):
            b.add_document(list(range(d * 10, d * 10 + 3 + d % 9)) + [EOD])
    return build_dataset(str(tmp_path / "s"), seq_len=5, num_samples=96, seed=0)


class IndexDataset(torch.utils.data.Dataset):
    """Sample i is a row of i's, so a batch shows exactly which samples it holds."""

    def __len__(self):
        return 96

    def __getitem__(self, i):
        return {"tokens": torch.full((4,), i, dtype=torch.int64)}


def test_shapes_and_micro_steps(dataset):
    it = BatchIterator(dataset, global_batch_size=12, micro_batch_size=3, dp_size=2, dp_rank=1)
    assert it.micro_batches_per_step == 2
    step = it.next_step()
    assert len(step) == 2 and it.consumed_samples == 12
    for mb in step:
        assert set(mb) == {"tokens", "labels", "position_ids", "document_ids"}
        assert all(v.shape == (3, 5) and v.dtype == torch.int64 for v in mb.values())


def test_dp_ranks_partition_each_global_batch():
    dataset = IndexDataset()
    its = [BatchIterator(dataset, 12, 2, dp_rank=r, dp_size=3) for r in range(3)]
    for g in range(len(dataset) // 12):
        per_rank = [[int(row[0]) for mb in it.next_step() for row in mb["tokens"]] for it in its]
        flat = [i for r in per_rank for i in r]
        assert sorted(flat) == list(range(12 * g, 12 * (g + 1)))  # disjoint, complete, in-order batch
    assert all(it.consumed_samples == len(dataset) for it in its)
    with pytest.raises(StopIteration):
        its[0].next_step()


def test_resume_equals_uninterrupted(dataset):
    full = list(BatchIterator(dataset, 8, 2, dp_rank=1, dp_size=2))
    first = BatchIterator(dataset, 8, 2, dp_rank=1, dp_size=2)
    for _ in range(5):
        next(first)
    state = first.state_dict()
    assert state["consumed_samples"] == 20
    resumed = BatchIterator(dataset, 8, 2, dp_rank=1, dp_size=2)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(full) == 5 + len(rest)
    for a, b in zip(full[5:], rest):
        assert all(torch.equal(a[k], b[k]) for k in a)
    also = BatchIterator(dataset, 8, 2, dp_rank=1, dp_size=2, consumed_samples=20)
    assert torch.equal(next(also)["tokens"], rest[0]["tokens"])


def test_invalid_sizes_are_clear(dataset):
    match = "global_batch_size 10 is not divisible by micro_batch_size 2 x dp_size 3"
    with pytest.raises(ValueError, match=match):
        BatchIterator(dataset, 10, 2, dp_size=3)
    with pytest.raises(ValueError, match="not a multiple"):
        BatchIterator(dataset, 8, 2, dp_size=2, consumed_samples=6)
    with pytest.raises(ValueError, match="past the end"):
        BatchIterator(dataset, 8, 2, consumed_samples=200)
    it = BatchIterator(dataset, 8, 2)
    next(it)
    with pytest.raises(RuntimeError, match="inside a global batch"):
        it.next_step()
