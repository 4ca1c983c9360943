"""Ring attention's flash-attn tile path (CUDA, flash-attn installed) merges tiles by log-sum-exp
exactly as the plain PyTorch tiles do. flash-attn cannot be installed here, so on CPU a fake with
flash-attn's layout and contract ((B, T, H, D) in; out and the (B, H, T) log-sum-exp back; a
backward taking the final out and lse and writing dq/dk/dv in place), computed in plain PyTorch, goes
through the same adapter (`flash_tile_kernel`) into the ring; the GPU test runs the real kernels."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import megaqwen.parallel.cp_flash_tiles as cpm
from megaqwen.kernels.attention import AttentionMeta, sdpa_attention
from megaqwen.parallel.context_parallel import ContextParallelMeta, ring_attention
from megaqwen.parallel.cp_flash_tiles import flash_tile_kernel

B, T, HQ, HK, D = 2, 37, 4, 2, 8


def _fake_flash_forward(q, k, v, scale):
    """flash-attn's non-causal forward in plain PyTorch: (B, T, H, D) -> out, lse (B, H, Tq)."""
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    lse = torch.logsumexp(s, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.exp(s - lse[..., None]), v)
    return out, lse


def _fake_flash_backward(do, q, k, v, out, lse, dq, dk, dv, scale):
    """flash-attn's backward from the final out and lse (not this tile's), in place."""
    p = torch.exp(torch.einsum("bqhd,bkhd->bhqk", q, k) * scale - lse[..., None])
    dv.copy_(torch.einsum("bhqk,bqhd->bkhd", p, do))
    dp = torch.einsum("bqhd,bkhd->bhqk", do, v)
    delta = (do * out).sum(-1).transpose(1, 2)  # (B, H, Tq)
    ds = p * (dp - delta[..., None])
    dq.copy_(torch.einsum("bhqk,bkhd->bqhd", ds, k) * scale)
    dk.copy_(torch.einsum("bhqk,bqhd->bkhd", ds, q) * scale)


def _ring(q, k, v, docs, tile, dout):
    out = ring_attention(q, k, v, ContextParallelMeta(docs, None, shape=(B, T), tile=tile), None)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


@pytest.mark.parametrize("tile", [5, 12])
def test_flash_tile_merge_equals_plain_tiles(tile, monkeypatch):
    g = torch.Generator().manual_seed(tile)
    docs = (torch.rand(B, T, generator=g) < 0.05).long().cumsum(1)  # documents of ~20 tokens
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        q, k, v = (torch.randn(B, T, h, D, generator=g, dtype=dtype, requires_grad=True)
                   for h in (HQ, HK, HK))
        dout = torch.randn(B, T, HQ, D, generator=g, dtype=dtype)
        for d in (docs, None):
            monkeypatch.setattr(cpm, "TILE_KERNEL", None)
            monkeypatch.setattr(cpm, "FUSED_TILES", False)
            plain = _ring(q, k, v, d, tile, dout)
            monkeypatch.setattr(cpm, "FUSED_TILES", True)
            calls = {"fwd": 0, "bwd": 0}

            def fwd(*a, calls=calls, **kw):
                calls["fwd"] += 1
                return _fake_flash_forward(*a, **kw)

            def bwd(*a, calls=calls, **kw):
                calls["bwd"] += 1
                return _fake_flash_backward(*a, **kw)

            monkeypatch.setattr(cpm, "TILE_KERNEL", flash_tile_kernel(fwd, bwd))
            flash = _ring(q, k, v, d, tile, dout)
            assert calls["fwd"] > 0 and calls["bwd"] == calls["fwd"]  # fully visible tiles took it
            for name, a, r in zip(("out", "dq", "dk", "dv"), flash, plain):
                err = ((a - r).abs().max() / r.abs().max()).item()
                assert err <= tol, (name, dtype, tile, d is None, err)


def test_flash_backward_kwargs_follow_the_installed_signature():
    def v25(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal, window_size,
            alibi_slopes, deterministic, rng_state=None): ...

    def v27(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
            window_size_left, window_size_right, softcap, alibi_slopes, deterministic, rng_state=None): ...

    assert set(cpm._flash_backward_kwargs(v25)) == {"dropout_p", "causal", "window_size", "alibi_slopes",
                                                    "deterministic", "rng_state"}
    assert cpm._flash_backward_kwargs(v27)["window_size_left"] == -1
    assert cpm._flash_backward_kwargs(v27)["softcap"] == 0.0


GPU_FLASH = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_FLASH, reason="needs CUDA and the flash-attn package (not installable on "
                                          "the CPU CI machine)")
def test_flash_attn_tiles_on_gpu_match_sdpa():
    """The real flash-attn tiles on CUDA: bf16 ring attention within bf16 rounding of fp32 SDPA."""
    assert cpm.fused_tile_kernel(torch.device("cuda")) is not None
    g = torch.Generator(device="cuda").manual_seed(0)
    docs = (torch.rand(B, 256, generator=g, device="cuda") < 0.02).long().cumsum(1)
    q, k, v = (torch.randn(B, 256, h, 64, generator=g, device="cuda", requires_grad=True)
               for h in (HQ, HK, HK))
    ref = sdpa_attention(q, k, v, AttentionMeta(docs))
    half = [x.detach().bfloat16().requires_grad_() for x in (q, k, v)]
    out = ring_attention(*half, ContextParallelMeta(docs, None, shape=(B, 256), tile=64), None)
    assert ((out.float() - ref).abs().max() / ref.abs().max()).item() < 2e-2
    dout = torch.randn_like(ref)
    grads = torch.autograd.grad(out, half, dout.bfloat16())
    refs = torch.autograd.grad(ref, (q, k, v), dout)
    for a, r in zip(grads, refs):
        assert ((a.float() - r).abs().max() / r.abs().max()).item() < 3e-2
