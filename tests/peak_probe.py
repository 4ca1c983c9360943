"""Peak resident memory of two fp32 AdamW steps of a debug-family model, in a fresh process (freed
memory stays resident, so a second measurement in one process would see nothing). Used by the
planner's tests against its estimate (the one memory model; the fit check's whole-trainer test
measures the trainer itself).

    python tests/peak_probe.py '{"vocab_size": 1024, "num_layers": 3}' B T [recompute] [--warm-up]

prints the peak resident set (VmHWM) above the process's baseline, measured after torch, the
allocator arenas and (with --warm-up) the kernels' code pages are resident, before the model
exists."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def measure_peak(model_kw: dict, batch: int, seq: int, recompute: str = "none", warm_up: bool = False) -> int:
    """Run this script in a fresh interpreter; its peak bytes above baseline."""
    args = [sys.executable, str(Path(__file__).resolve()), repr(model_kw), str(batch), str(seq), recompute]
    res = subprocess.run(args + (["--warm-up"] if warm_up else []), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return int(res.stdout.strip().splitlines()[-1])


def _main(kw: str, batch: str, seq: str, recompute: str, *flags: str) -> None:
    import gc
    import resource

    import torch

    from megaqwen.kernels.registry import resolve_ops
    from megaqwen.models import build_model
    from megaqwen.models.config import get_config
    from megaqwen.models.qwen2.model import Attention
    from megaqwen.parallel.activation import apply_recompute

    torch.set_num_threads(1)

    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()

    def hwm() -> int:
        status = Path("/proc/self/status").read_text().splitlines()
        return next(int(x.split()[1]) * 1024 for x in status if x.startswith("VmHWM"))

    def step(model, opt, tokens) -> None:
        parts = model(tokens[:, :-1], labels=tokens[:, 1:])
        (parts.sum / parts.count).backward()
        opt.step()
        opt.zero_grad()

    cfg = get_config("debug", **eval(kw))
    tokens = torch.randint(0, cfg.vocab_size, (int(batch), int(seq) + 1))
    if "--warm-up" in flags:  # a tiny model first: the kernels' code pages and thread pools are resident
        tiny_cfg = get_config("debug", vocab_size=64, num_layers=1)
        tiny = build_model(tiny_cfg, resolve_ops(device="cpu"), seed=0)
        step(tiny, torch.optim.AdamW(tiny.parameters()), tokens[:, :17] % 64)
        del tiny
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    base = rss()
    model = build_model(cfg, resolve_ops(device="cpu"), seed=0)
    apply_recompute(model.model.layers, recompute, (Attention, "core"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        step(model, opt, tokens)
    print(hwm() - base)


if __name__ == "__main__":
    _main(*sys.argv[1:])
