"""The cached-attention path (`kernels.attention`: KVCache, CachedAttention, cached_attention):
a left-padded prefill plus decode steps, with keys appended per step, equals plain causal SDPA over
each row's real tokens alone; the mask the backends read is what the docstring says."""

from __future__ import annotations

import pytest
import torch

from megaqwen.kernels.attention import KVCache, LayerCache, sdpa_attention

B, HQ, HK, D = 3, 4, 2, 8
LENGTHS = [5, 1, 3]


def test_prefill_then_decode_equals_causal_attention_per_row():
    g = torch.Generator().manual_seed(0)
    steps = 4
    total = [n + steps for n in LENGTHS]
    q_all = [torch.randn(1, n, HQ, D, generator=g, dtype=torch.float64) for n in total]
    k_all = [torch.randn(1, n, HK, D, generator=g, dtype=torch.float64) for n in total]
    v_all = [torch.randn(1, n, HK, D, generator=g, dtype=torch.float64) for n in total]
    want = [sdpa_attention(q, k, v) for q, k, v in zip(q_all, k_all, v_all)]  # (1, n, HQ, D) per row

    width = max(LENGTHS)
    pad = torch.tensor([width - n for n in LENGTHS])
    slot = torch.arange(width)[None]
    valid, pos = slot >= pad[:, None], (slot - pad[:, None]).clamp(min=0)

    def left_pad(xs, n_of):  # rows' first n tokens, left-padded with garbage (must not matter)
        out = torch.full((B, width, xs[0].shape[2], D), 1e3, dtype=torch.float64)
        for i, x in enumerate(xs):
            out[i, width - n_of[i]:] = x[0, :n_of[i]]
        return out

    cache = KVCache(B, width + steps, "cpu")
    step = cache.step(pos, valid)
    layer = step.for_layer("0")
    assert isinstance(layer, LayerCache) and layer.mask().shape == (B, 1, width, width)
    k, v = layer.append(left_pad(k_all, LENGTHS), left_pad(v_all, LENGTHS))
    out = sdpa_attention(left_pad(q_all, LENGTHS), k, v, layer)
    for i, n in enumerate(LENGTHS):
        assert torch.allclose(out[i, width - n:], want[i][0, :n], atol=1e-12)
        assert torch.isfinite(out[i]).all()  # padding queries attend themselves: no NaN
    for s in range(steps):
        at = [n + s for n in LENGTHS]  # index of this step's token in each row
        meta = cache.step(torch.tensor(at)[:, None]).for_layer("0")
        assert meta.k_positions_BS.shape == (B, width + s + 1) and meta.q_slots.tolist() == [width + s]
        k, v = meta.append(torch.stack([x[0, t] for x, t in zip(k_all, at)])[:, None],
                           torch.stack([x[0, t] for x, t in zip(v_all, at)])[:, None])
        out = sdpa_attention(torch.stack([x[0, t] for x, t in zip(q_all, at)])[:, None], k, v, meta)
        for i, t in enumerate(at):
            assert torch.allclose(out[i, 0], want[i][0, t], atol=1e-12)


def test_keep_drops_rows_and_a_full_cache_is_named():
    cache = KVCache(3, 2, "cpu")
    cache.step(torch.zeros(3, 1, dtype=torch.long)).for_layer("0").append(
        torch.arange(3.0).view(3, 1, 1, 1), torch.zeros(3, 1, 1, 1))
    cache.keep(torch.tensor([2, 0]))
    assert cache.batch == 2 and cache.k["0"][:, 0].flatten().tolist() == [2.0, 0.0]
    cache.step(torch.ones(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="KV cache full: 2 \\+ 1 slots > capacity 2"):
        cache.step(torch.ones(2, 1, dtype=torch.long))
