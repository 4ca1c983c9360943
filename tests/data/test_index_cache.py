"""Sample indexes built once into a cache and memory-mapped; built only as far as the run needs."""

import logging
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from megaqwen.data import BatchIterator, IndexedDatasetBuilder, build_dataset
from megaqwen.data import sample_order as order
from megaqwen.data.index_cache import IndexCache, find_entry
from megaqwen.data.sample_order import feistel_permutation

EOD = 151643


def make_shard(prefix, n_docs=300, seed=0):
    rng = np.random.default_rng(seed)
    with IndexedDatasetBuilder(prefix) as b:
        for d in range(n_docs):
            b.add_document([1000 + d] * int(rng.integers(1, 12)) + [EOD])
    return str(prefix)


@pytest.fixture
def large_rule(monkeypatch):
    """Thresholds small enough that a test shard takes the large-shard order (Feistel, capped blocks)."""
    monkeypatch.setattr(order, "MAX_DOCS", 16)
    monkeypatch.setattr(order, "MAX_BLOCK", 32)
    monkeypatch.setattr(order, "DOC_CHUNK", 7)


def samples(ds, n):
    return [ds[i]["tokens"] for i in range(n)]


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4097])
def test_feistel_is_a_bijection(n):
    keys = np.arange(1, 7, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    perm = feistel_permutation(np.arange(n), n, keys)
    assert sorted(perm.tolist()) == list(range(n))
    assert np.array_equal(feistel_permutation(np.arange(5, min(n, 40)), n, keys), perm[5:40])  # pointwise


def test_large_shard_builds_only_what_it_needs_and_keeps_prefixes(tmp_path, large_rule):
    prefix = make_shard(tmp_path / "s")
    short = build_dataset(prefix, seq_len=4, num_samples=8, seed=3)
    long = build_dataset(prefix, seq_len=4, num_samples=2000, seed=3)  # several epochs
    assert short.block == 32 and len(short.sample_order) == 32
    assert len(short.doc_order) < 60 < 300  # the documents of one block, not an epoch
    assert all(torch.equal(a, b) for a, b in zip(samples(short, 8), samples(long, 8)))
    assert long.num_epochs > 2
    for e in range(long.num_epochs - 1):  # every whole epoch is a permutation of the documents
        assert sorted(long.doc_order[e * 300 : (e + 1) * 300].tolist()) == list(range(300))
    assert not np.array_equal(long.doc_order[:300], long.doc_order[300:600])  # a new shuffle per epoch


def test_cache_equals_memory_and_is_reused(tmp_path, large_rule, caplog):
    prefix = make_shard(tmp_path / "s")
    cache = IndexCache(str(tmp_path / "cache"))
    mem = build_dataset([prefix, make_shard(tmp_path / "t", 50, 1)], seq_len=5, num_samples=400, seed=1)
    with caplog.at_level(logging.INFO, "megaqwen.data.index_cache"):
        built = build_dataset([prefix, str(tmp_path / "t")], seq_len=5, num_samples=400, seed=1, cache=cache)
        assert (
            caplog.text.count("index cache: built") == 3 and "reused" not in caplog.text
        )  # 2 shards + blend
        caplog.clear()
        again = build_dataset([prefix, str(tmp_path / "t")], seq_len=5, num_samples=160, seed=1, cache=cache)
        assert caplog.text.count("index cache: reused") == 3 and "built" not in caplog.text  # a shorter run
    assert isinstance(again.datasets[0].sample_order, np.memmap)
    for i in range(400):
        assert all(torch.equal(mem[i][k], built[i][k]) for k in mem[i])
    assert all(torch.equal(a, b) for a, b in zip(samples(mem, 160), samples(again, 160)))
    with caplog.at_level(logging.INFO, "megaqwen.data.index_cache"):
        caplog.clear()
        build_dataset(prefix, seq_len=5, num_samples=400, seed=2, cache=cache)  # another seed: another key
        assert "index cache: built" in caplog.text


def test_new_order_is_stable_across_resume_and_dp_sizes(tmp_path, large_rule):
    prefix = make_shard(tmp_path / "s")
    ds = build_dataset(prefix, seq_len=6, num_samples=96, seed=0, cache=IndexCache(str(tmp_path / "c")))

    def global_batches(dp, start=0):
        its = [BatchIterator(ds, 12, 2, dp_rank=r, dp_size=dp, consumed_samples=start) for r in range(dp)]
        out = []
        while its[0].consumed_samples < len(ds):
            steps = [it.next_step() for it in its]  # micro-step m of rank r: samples base + r * 2 ...
            out.append(torch.cat([steps[r][m]["tokens"] for m in range(len(steps[0])) for r in range(dp)]))
        return out

    one = global_batches(1)
    assert all(torch.equal(a, b) for a, b in zip(one, global_batches(2)))  # dp=2's ranks tile dp=1's batches
    assert all(torch.equal(a, b) for a, b in zip(one, global_batches(3)))
    assert all(torch.equal(a, b) for a, b in zip(one[3:], global_batches(2, start=36)))  # resume at step 3


_KILL_WRITER = """
import os, signal, sys
from megaqwen.data import index_cache, sample_order
from megaqwen.data.blend import build_dataset
sample_order.MAX_DOCS, sample_order.MAX_BLOCK, sample_order.DOC_CHUNK = 16, 32, 7
close = index_cache.NpyWriter.close
def close_then_die(self):
    close(self)
    os.kill(os.getpid(), signal.SIGKILL)  # killed after writing the first array of the entry
index_cache.NpyWriter.close = close_then_die
build_dataset(sys.argv[1], seq_len=5, num_samples=100, seed=4, cache=index_cache.IndexCache(sys.argv[2]))
"""


def test_a_writer_killed_mid_write_leaves_nothing_readable(tmp_path, large_rule, caplog):
    prefix, root = make_shard(tmp_path / "s"), tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_WRITER, prefix, str(root)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -9, proc.stderr
    partial = [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    assert len(partial) == 1 and (partial[0] / "doc_order.npy").is_file()  # half an entry on disk
    assert [p for p in root.iterdir() if not p.name.startswith(".tmp-")] == []  # but no entry
    with caplog.at_level(logging.INFO, "megaqwen.data.index_cache"):
        ds = build_dataset(prefix, seq_len=5, num_samples=100, seed=4, cache=IndexCache(str(root)))
        assert "index cache: built" in caplog.text  # rebuilt, never read the partial one
    mem = build_dataset(prefix, seq_len=5, num_samples=100, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(samples(ds, 100), samples(mem, 100)))


def test_other_ranks_wait_for_the_builder_or_fail_clearly(tmp_path):
    prefix, root = make_shard(tmp_path / "s"), str(tmp_path / "cache")
    waiter = IndexCache(root, builder=False, timeout_s=0.5, who="rank 0 of the job")
    with pytest.raises(TimeoutError, match="rank 0 of the job builds.*index_cache_shared"):
        build_dataset(prefix, seq_len=5, num_samples=40, seed=0, cache=waiter)
    later = threading.Timer(
        0.5, lambda: build_dataset(prefix, seq_len=5, num_samples=40, seed=0, cache=IndexCache(root))
    )
    later.start()
    t0 = time.monotonic()
    ds = build_dataset(prefix, seq_len=5, num_samples=40, seed=0, cache=IndexCache(root, builder=False))
    later.join()
    assert time.monotonic() - t0 >= 0.4 and isinstance(ds.sample_order, np.memmap)
    assert find_entry(tmp_path / "cache", "gpt", "0" * 16, 0) is None


def test_a_rewritten_shard_gets_a_new_entry(tmp_path):
    prefix, root = make_shard(tmp_path / "s"), tmp_path / "cache"
    build_dataset(prefix, seq_len=5, num_samples=40, seed=0, cache=IndexCache(str(root)))
    os.utime(f"{prefix}.idx", ns=(1, 1))  # as if rewritten (size and time are part of the key)
    build_dataset(prefix, seq_len=5, num_samples=40, seed=0, cache=IndexCache(str(root)))
    assert len(list(root.glob("gpt-*"))) == 2


def test_a_held_out_split_is_part_of_the_key(tmp_path):
    from megaqwen.data.holdout import split_documents

    prefix, cache = make_shard(tmp_path / "s"), IndexCache(str(tmp_path / "cache"))
    for frac in (0.1, 0.2):
        docs = lambda ix, f=frac: split_documents(ix, f, held_out=False)  # noqa: E731
        mem = build_dataset(prefix, seq_len=8, num_samples=50, seed=0, documents=docs)
        cached = build_dataset(prefix, seq_len=8, num_samples=50, seed=0, documents=docs, cache=cache)
        assert all(torch.equal(a, b) for a, b in zip(samples(mem, 50), samples(cached, 50)))
    assert len(list((tmp_path / "cache").glob("gpt-*"))) == 2
