"""Chunked vs naive linear + cross-entropy on CPU: time of forward+backward and peak memory.

Each variant runs in a fresh subprocess so its peak resident memory (ru_maxrss) is its own; the
table reports the peak *increase* over the memory held right before the timed call (inputs,
weight and their gradient buffers excluded).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_kernels_ce.py            # 0.5B: V=151,936
    .venv/bin/python benchmarks/bench_kernels_ce.py --tokens 1024 --vocab 32000  # quick look
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

VARIANTS = ("naive", "chunked")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_one(variant: str, tokens: int, hidden: int, vocab: int, threads: int) -> dict:
    import torch

    from megaqwen.kernels.cross_entropy import linear_cross_entropy_chunked, linear_cross_entropy_ref

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    h = (torch.randn(tokens, hidden) * 0.5).requires_grad_()
    w = (torch.randn(vocab, hidden) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,))
    h.grad, w.grad = torch.zeros_like(h), torch.zeros_like(w)  # gradient buffers count as inputs
    fn = linear_cross_entropy_ref if variant == "naive" else linear_cross_entropy_chunked
    base = _rss_mb()
    t0 = time.perf_counter()
    loss = fn(h, w, labels)
    loss.backward()
    elapsed = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"variant": variant, "loss": loss.item(), "seconds": elapsed, "peak_extra_mb": peak - base,
            "inputs_mb": base}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(run_one(a.child, a.tokens, a.hidden, a.vocab, a.threads)))
        return
    logits_gb = a.tokens * a.vocab * 4 / 1e9
    print(f"# linear+CE fwd+bwd, N={a.tokens} H={a.hidden} V={a.vocab} fp32, {a.threads} thread(s), "
          f"{platform.processor() or platform.machine()}; full fp32 logits = {logits_gb:.2f} GB")
    print(f"{'variant':<10} {'time fwd+bwd (s)':>17} {'peak extra RSS (MB)':>20} {'loss':>10}")
    rows = []
    for v in a.variants:
        cmd = [sys.executable, __file__, "--child", v, "--tokens", str(a.tokens), "--hidden",
               str(a.hidden), "--vocab", str(a.vocab), "--threads", str(a.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        r = json.loads(out.splitlines()[-1])
        rows.append(r)
        print(f"{v:<10} {r['seconds']:>17.1f} {r['peak_extra_mb']:>20.0f} {r['loss']:>10.5f}", flush=True)
    if len(rows) == 2:
        print(f"# chunked/naive: time x{rows[1]['seconds'] / rows[0]['seconds']:.2f}, "
              f"peak memory x{rows[1]['peak_extra_mb'] / rows[0]['peak_extra_mb']:.3f}")


if __name__ == "__main__":
    main()
