"""DCA equals vLLM's dual-chunk attention: an independent port, written here, of what vLLM runs for
Qwen2.5-1M (`DualChunkRotaryEmbedding`'s cos/sin caches and `DualChunkFlashAttentionImpl`'s prefill
loop, dense path), in float64, against megaqwen's tables + chunked kernel (float64), <= 1e-6.

The port follows vLLM's structure, not ours: five position caches indexed like vLLM's (q by p % s,
qc = (arange(s) + s).clamp(max=c) by p % s, inter = qc[s - 1] for every query, k = arange(T) % s);
the length temperature as vLLM applies it (keys and the softmax scale each multiplied by
max(1, 0.1 ln(L / orig) + 1) when orig > 0); the `begin` / `prev_chunk_end_pos` loop with
flash-attention calls (causal intra, non-causal succ and inter) merged by softmax over their lse.
"""

import math

import pytest
import torch

from megaqwen.kernels.dca import DCAConfig, dca_apply_rope, dca_attention, dca_rope


def _rotate_neox(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _cache(t_float, inv_freq):
    """vLLM's cos_sin cache rows for positions t: cat(cos, sin) of outer(t, inv_freq)."""
    freqs = torch.outer(t_float, inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def _rotate(x, cos_sin):
    """x (T, H, D), cos_sin (T, D) (half cos, half sin): neox style as vLLM's _apply_rotary_embedding."""
    cos, sin = cos_sin.chunk(2, dim=-1)
    cos, sin = cos.repeat(1, 2)[:, None], sin.repeat(1, 2)[:, None]
    return x * cos + _rotate_neox(x) * sin


def _flash(q, k, v, scale, causal):
    """flash_attn_varlen_func for one sequence with return_softmax_lse: q (Tq, H, D), k/v (Tk, H, D)."""
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    if causal:  # bottom-right aligned, as flash-attn
        tq, tk = s.shape[-2:]
        s = s.masked_fill(torch.ones(tq, tk, dtype=torch.bool).triu(1 + tk - tq), float("-inf"))
    lse = s.logsumexp(-1)  # (H, Tq)
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v), lse


def vllm_dual_chunk(q, k, v, chunk_size, local_size, orig, theta, scale):
    """q (T, H, D), k/v (T, H, D) un-rotated (float64) -> the attention output (T, H, D)."""
    t, _, d = q.shape
    chunk_len = chunk_size - local_size
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ar = torch.arange(chunk_len, dtype=torch.float64)
    q_cache = _cache(ar, inv_freq)
    qc_cache = _cache((ar + chunk_len).clamp(max=chunk_size), inv_freq)
    k_cache = _cache(torch.arange(t, dtype=torch.float64) % chunk_len, inv_freq)
    positions = torch.arange(t)
    key = _rotate(k, k_cache[positions])
    query = _rotate(q, q_cache[positions % chunk_len])
    query_succ = _rotate(q, qc_cache[positions % chunk_len])
    query_inter = _rotate(q, qc_cache[chunk_len - 1].repeat(t, 1))
    if orig > 0:  # prefill: keys and softmax scale by the sequence's scaling factor
        scaling = max(1.0, 0.1 * math.log(t / orig) + 1.0)
        key = key * scaling
        scale = scale * scaling
    results = []
    begin = 0
    while begin < t:
        prev = (begin // chunk_len) * chunk_len
        end = min(prev + chunk_len, t)
        parts = [_flash(query[begin:end], key[prev:end], v[prev:end], scale, causal=True)]
        if prev - chunk_len >= 0:
            parts.append(_flash(query_succ[begin:end], key[prev - chunk_len:prev],
                                v[prev - chunk_len:prev], scale, causal=False))
        if prev - 2 * chunk_len >= 0:
            parts.append(_flash(query_inter[begin:end], key[:prev - chunk_len], v[:prev - chunk_len],
                                scale, causal=False))
        outs = torch.stack([o for o, _ in parts])  # (n, Tq, H, D)
        lses = torch.stack([lse for _, lse in parts])  # (n, H, Tq)
        w = (lses - lses.max(0).values).exp()
        w = w / w.sum(0)
        results.append((outs * w.permute(0, 2, 1)[..., None]).sum(0))
        begin = end
    return torch.cat(results)


@pytest.mark.parametrize("orig", [0, 10])
@pytest.mark.parametrize("t,c,w", [(40, 16, 4), (100, 32, 8), (40, 16, 10)])
def test_dca_equals_vllm_port(t, c, w, orig):
    """With orig=10 the temperature is on (1.14 at T=40, 1.23 at T=100; logits x1.29, x1.52)."""
    g = torch.Generator().manual_seed(t + c + w)
    hq, hk, d, theta = 4, 2, 16, 100.0
    q = torch.randn(t, hq, d, generator=g, dtype=torch.float64) * 3
    k = torch.randn(t, hk, d, generator=g, dtype=torch.float64) * 3
    v = torch.randn(t, hk, d, generator=g, dtype=torch.float64)
    scale = d**-0.5
    k_rep, v_rep = (x.repeat_interleave(hq // hk, dim=1) for x in (k, v))  # vLLM: kv head h // group
    want = vllm_dual_chunk(q, k_rep, v_rep, c, w, orig, theta, scale)

    dca = DCAConfig(c, w, orig)
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = dca_rope(torch.arange(t)[None], inv_freq, dca)
    q3, k_rot = dca_apply_rope(q[None], k[None], cos, sin)
    got = dca_attention(q3, k_rot, v[None], scale=scale, dca=dca)[0]
    assert (got - want).abs().max().item() <= 1e-6
    if orig:  # the temperature matters at these sizes: without it the outputs move
        off = dca_attention(q3, k_rot, v[None], scale=scale, dca=DCAConfig(c, w))[0]
        assert (off - want).abs().max().item() > 1e-2
    paper = DCAConfig(c, w, orig, variant="paper")  # the paper's text is a different attention
    cos_p, sin_p = dca_rope(torch.arange(t)[None], inv_freq, paper)
    q3p, kp = dca_apply_rope(q[None], k[None], cos_p, sin_p)
    assert (dca_attention(q3p, kp, v[None], scale=scale, dca=paper)[0] - want).abs().max().item() > 1e-2
