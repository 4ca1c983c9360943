"""Per-kernel achieved bandwidth vs the device's measured copy bandwidth, and training-step MFU
with kernels on vs off. Needs a CUDA GPU (not run in CI; see benchmarks/RESULTS.md).

    python benchmarks/bench_kernels_gpu.py --model qwen2.5-0.5b --seq 2048 --batch 4 --peak-tflops 989

Bandwidth of a memory-bound kernel = bytes it must read + write / time; the ceiling is a
device-to-device `copy_` of a 1 GiB buffer (2 GiB moved), which is what such kernels can reach.
"""

from __future__ import annotations

import argparse

import torch

from megaqwen.kernels.cross_entropy import linear_cross_entropy_chunked, linear_cross_entropy_ref
from megaqwen.kernels.registry import KernelConfig, resolve_ops
from megaqwen.kernels.rmsnorm import rms_norm_ref, rms_norm_triton
from megaqwen.kernels.rope import apply_rope_ref, apply_rope_triton, rope_cos_sin, rope_inv_freq
from megaqwen.kernels.swiglu import swiglu_ref, swiglu_triton
from megaqwen.models import get_config
from megaqwen.models.qwen2 import build_model


def cuda_time(fn, warmup: int = 3, iters: int = 10) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / cuda_time(lambda: dst.copy_(src))


def kernel_table(tokens: int, hidden: int, inter: int, heads: int, kv_heads: int, ceiling: float):
    dt, dev = torch.bfloat16, "cuda"
    e = 2  # bytes per bf16 element
    x = torch.randn(tokens, hidden, dtype=dt, device=dev, requires_grad=True)
    w = torch.ones(hidden, dtype=dt, device=dev, requires_grad=True)
    g = torch.randn(tokens, inter, dtype=dt, device=dev, requires_grad=True)
    u = torch.randn(tokens, inter, dtype=dt, device=dev, requires_grad=True)
    d = hidden // heads
    q = torch.randn(1, tokens, heads, d, dtype=dt, device=dev)
    k = torch.randn(1, tokens, kv_heads, d, dtype=dt, device=dev)
    cos, sin = rope_cos_sin(torch.arange(tokens, device=dev)[None], rope_inv_freq(d, 1e6, dev))
    dy_n, dy_s = torch.randn_like(x), torch.randn_like(g)
    # fwd+bwd through autograd.grad: .backward() would add a read-modify-write of .grad per call
    grad = torch.autograd.grad
    # (name, impl, call, bytes moved by an ideal kernel)
    cases = [
        ("rmsnorm fwd", lambda f: f(x, w, 1e-6), {"torch": rms_norm_ref, "triton": rms_norm_triton},
         2 * tokens * hidden * e),
        ("rmsnorm fwd+bwd", lambda f: grad(f(x, w, 1e-6), (x, w), dy_n),
         {"torch": rms_norm_ref, "triton": rms_norm_triton}, 5 * tokens * hidden * e),
        ("swiglu fwd", lambda f: f(g, u), {"torch": swiglu_ref, "triton": swiglu_triton},
         3 * tokens * inter * e),
        ("swiglu fwd+bwd", lambda f: grad(f(g, u), (g, u), dy_s),
         {"torch": swiglu_ref, "triton": swiglu_triton}, 8 * tokens * inter * e),
        ("rope fwd (q,k)", lambda f: f(q, k, cos, sin),
         {"torch": apply_rope_ref, "triton": apply_rope_triton},
         2 * tokens * (heads + kv_heads) * d * e + 2 * tokens * d * 4),
    ]
    print(f"copy bandwidth: {ceiling / 1e9:.0f} GB/s")
    print(f"{'kernel':<18} {'impl':<7} {'time (us)':>10} {'GB/s':>8} {'of copy':>8}")
    for name, call, impls, nbytes in cases:
        for impl, f in impls.items():
            t = cuda_time(lambda f=f, call=call: call(f))
            print(f"{name:<18} {impl:<7} {t * 1e6:>10.1f} {nbytes / t / 1e9:>8.0f} "
                  f"{nbytes / t / ceiling:>8.1%}")


def ce_table(tokens: int, hidden: int, vocab: int):
    h = torch.randn(tokens, hidden, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    w = torch.randn(vocab, hidden, dtype=torch.bfloat16, device="cuda", requires_grad=True) * 0.02
    w = w.detach().requires_grad_()
    y = torch.randint(0, vocab, (tokens,), device="cuda")
    print(f"{'linear+CE':<18} {'impl':<8} {'time (ms)':>10} {'peak MB':>9}")
    for name, f in (("naive", linear_cross_entropy_ref),
                    ("chunked", lambda *a: linear_cross_entropy_chunked(*a, backend="triton"))):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        # autograd.grad, not .backward(): .grad buffers left by the first variant would sit in the
        # second one's `base` and make its peak look smaller by a (V, H) gradient
        t = cuda_time(lambda f=f: torch.autograd.grad(f(h, w, y), (h, w)), warmup=1, iters=3)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        print(f"{'fwd+bwd':<18} {name:<8} {t * 1e3:>10.1f} {peak:>9.0f}")


def step_mfu(model_name: str, seq: int, batch: int, peak_tflops: float, kernels: KernelConfig) -> float:
    cfg = get_config(model_name)
    model = build_model(cfg, ops=resolve_ops(kernels, device="cuda"), device="cuda", dtype=torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        model(tokens, labels=tokens).mean().backward()
        opt.step()

    t = cuda_time(step, warmup=2, iters=5)
    return cfg.flops_per_token(seq) * batch * seq / t / (peak_tflops * 1e12)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-0.5b")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels_gpu.py needs a CUDA device; for CPU see bench_kernels_ce.py")
    cfg = get_config(a.model)
    tokens = a.seq * a.batch
    kernel_table(tokens, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                 copy_bandwidth())
    ce_table(tokens, cfg.hidden_size, cfg.vocab_size)
    off = KernelConfig(rmsnorm="torch", swiglu="torch", rope="torch", cross_entropy="torch",
                       attention="sdpa")
    for label, kc in (("kernels off", off), ("kernels auto", KernelConfig())):
        print(f"train step MFU, {a.model} seq={a.seq} batch={a.batch}, {label}: "
              f"{step_mfu(a.model, a.seq, a.batch, a.peak_tflops, kc):.1%}")


if __name__ == "__main__":
    main()
