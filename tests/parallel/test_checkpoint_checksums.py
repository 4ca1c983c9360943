"""Checkpoint checksums over gloo ranks: each file is summed by one rank and every rank gets the
same table; on resume the ranks check their shares and agree on the first problem (the same verdict
on every rank, whichever rank read the damaged file), also over a separate group as the
background saver uses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist
from parallel_harness import spawn

from megaqwen.train import integrity

pytestmark = pytest.mark.distributed
FILES = {f"__{r}_0.distcp": bytes(range(256)) * (r + 3) for r in range(3)} | {".metadata": b"meta" * 100}


def _sums_and_verdicts(rank: int, world: int, folder: str) -> list:
    root = Path(folder)
    group = dist.new_group(backend="gloo")  # the background saver's own group
    sums = integrity.gather_sums(root, group)
    all_sums = [None] * world
    dist.all_gather_object(all_sums, sums)
    clean = integrity.check(root, sums, deep=True)
    dist.barrier()
    if rank == 0:  # a flipped bit in the file that the last rank checks, same size
        name = sorted(sums)[world - 1]
        data = bytearray((root / name).read_bytes())
        data[7] ^= 0x01
        (root / name).write_bytes(bytes(data))
    dist.barrier()
    flipped = integrity.check(root, sums, deep=True)
    verdicts = [None] * world
    dist.all_gather_object(verdicts, flipped)
    return [all_sums, clean, verdicts]


def test_ranks_share_the_sums_and_agree_on_a_flipped_bit(tmp_path):
    for name, data in FILES.items():
        (tmp_path / name).write_bytes(data)
    world = 2
    all_sums, clean, verdicts = spawn(_sums_and_verdicts, world, str(tmp_path))
    want = {name: integrity.file_sum(tmp_path / name) for name in FILES}  # one process, after the flip
    assert all_sums[0] == all_sums[1] and set(all_sums[0]) == set(FILES)
    changed = [n for n in FILES if all_sums[0][n] != want[n]]
    assert changed == [sorted(FILES)[world - 1]]  # only the flipped file's CRC moved
    assert clean is None
    assert verdicts[0] == verdicts[1] and verdicts[0].startswith(f"{changed[0]} has CRC-32"), verdicts
