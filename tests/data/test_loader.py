"""Worker processes read the next micro-batches ahead: same batches, one-integer state, waits hidden."""

import time

import torch

from megaqwen.data import BatchIterator, IndexedDatasetBuilder, build_dataset

EOD = 151643


class SlowDataset(torch.utils.data.Dataset):
    """Sample i is a row of i's, read in `delay` seconds (a slow filesystem)."""

    def __init__(self, n=64, delay=0.0):
        self.n, self.delay = n, delay

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        time.sleep(self.delay)
        return {"tokens": torch.full((4,), i, dtype=torch.int64)}


def test_workers_give_the_same_batches_and_resume(tmp_path):
    with IndexedDatasetBuilder(tmp_path / "s") as b:
        for d in range(40):
            b.add_document(list(range(d * 10, d * 10 + 3 + d % 9)) + [EOD])
    ds = build_dataset(str(tmp_path / "s"), seq_len=5, num_samples=96, seed=0)
    plain = list(BatchIterator(ds, 8, 2, dp_rank=1, dp_size=2))
    ahead = BatchIterator(ds, 8, 2, dp_rank=1, dp_size=2, num_workers=2, prefetch=3)
    got = [next(ahead) for _ in range(5)]
    assert ahead.consumed_samples == 20  # handed out, not read ahead
    ahead.load_state_dict({"consumed_samples": 8})  # reposition: the workers restart there
    got += list(ahead)
    assert ahead._loader is None  # exhausted: its workers are stopped, not left to garbage collection
    assert len(got) == len(plain) + 3
    for a, b in zip(plain[:5] + plain[2:], got):
        assert all(torch.equal(a[k], b[k]) for k in a)


def _waits(it, compute_s, n):
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        next(it)
        out.append(time.perf_counter() - t0)
        time.sleep(compute_s)  # the training step
    return out


def test_a_slow_reader_is_hidden_by_the_workers():
    ds = SlowDataset(delay=0.02)  # 0.04 s per micro-batch of 2, the step takes 0.1 s
    plain = _waits(BatchIterator(ds, 4, 2), 0.1, 10)
    ahead_it = BatchIterator(ds, 4, 2, num_workers=2, prefetch=2)
    ahead = _waits(ahead_it, 0.1, 10)
    ahead_it.close()
    assert sum(plain[1:]) > 0.3  # 9 reads of >= 0.04 s each
    assert sum(ahead[1:]) < 0.25 * sum(plain[1:]), (ahead, plain)  # the first waits for start-up
