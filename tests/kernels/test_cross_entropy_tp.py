"""Vocab-parallel (tensor-parallel) linear + CE on 2 gloo ranks equals the unsharded loss/grads."""

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megaqwen.kernels.cross_entropy import linear_cross_entropy_chunked, linear_cross_entropy_ref

N, H, V, WORLD = 29, 24, 302, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::4] = -100
    return hidden, weight, labels


def _grads(fn, hidden, weight, labels, reduction, **kw):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = fn(h, w, labels, reduction=reduction, **kw)
    upstream = torch.linspace(0.5, 1.5, loss.numel()).view(loss.shape)
    (loss * upstream).sum().backward()
    return loss.detach(), h.grad, w.grad


def _worker(rank, port, cases):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        hidden, weight, labels = _inputs()
        shard = slice(rank * V // WORLD, (rank + 1) * V // WORLD)
        for name, fn, kw in cases:
            for reduction in ("mean", "sum", "none"):
                want = _grads(linear_cross_entropy_ref, hidden, weight, labels, reduction, z_loss=1e-3)
                loss, dh, dw = _grads(fn, hidden, weight[shard], labels, reduction,
                                      tp_group=dist.group.WORLD, z_loss=1e-3, **kw)
                msg = f"{name} reduction={reduction} rank={rank}"
                torch.testing.assert_close(loss, want[0], rtol=1e-5, atol=1e-6, msg=msg + " loss")
                torch.testing.assert_close(dh, want[1], rtol=1e-5, atol=1e-6, msg=msg + " dhidden")
                torch.testing.assert_close(dw, want[2][shard], rtol=1e-5, atol=1e-6, msg=msg + " dweight")
    finally:
        dist.destroy_process_group()


CASES = [
    ("reference", linear_cross_entropy_ref, {}),
    ("chunked-torch", linear_cross_entropy_chunked, {"chunk_rows": 8, "backend": "torch"}),
    ("chunked-triton", linear_cross_entropy_chunked, {"chunk_rows": 8, "backend": "triton"}),
]


@pytest.mark.distributed
def test_vocab_parallel_matches_unsharded(monkeypatch):
    # spawned ranks unpickle `_worker` by module name: make this test module importable there
    root = str(Path(__file__).resolve().parents[2])
    monkeypatch.syspath_prepend(root)  # multiprocessing hands the parent's sys.path to children
    mp.spawn(_worker, args=(_free_port(), CASES), nprocs=WORLD, join=True)
