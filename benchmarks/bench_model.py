"""Step time of the debug model and forward time of published configs, on this machine.

    python benchmarks/bench_model.py                       # CPU: debug train step + 0.5B forward
    python benchmarks/bench_model.py --device cuda --dtype bf16 --models debug qwen2.5-0.5b qwen2.5-1.5b

Prints a Markdown table: median of --repeat timed runs after --warmup untimed ones.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from megaqwen.kernels.registry import KernelConfig, resolve_ops
from megaqwen.models import build_model, get_config
from megaqwen.train.config import TrainConfig
from megaqwen.train.optim import build_optimizer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(name: str, mode: str, batch: int, seq: int, device, dtype, warmup, repeat, ce: str) -> dict:
    cfg = get_config(name)
    torch.manual_seed(0)
    ops = resolve_ops(KernelConfig(cross_entropy=ce), device=device.type)  # as the trainer does
    model = build_model(cfg, ops, device=device)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    ctx = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16"
           else torch.autocast(device.type, enabled=False))
    if mode == "forward":
        model.eval()

        @torch.no_grad()
        def fn():
            with ctx:
                model(x, labels=y)
    else:
        opt = build_optimizer(model, TrainConfig(), device=device.type)

        def fn():
            with ctx:
                loss = model(x, labels=y).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    sec = timed(fn, device, warmup, repeat)
    return {"model": name, "mode": mode, "loss kernel": ops.choices["cross_entropy"],
            "batch x seq": f"{batch}x{seq}", "dtype": dtype,
            "params (M)": f"{cfg.num_params() / 1e6:.1f}", "time (ms)": f"{sec * 1e3:.1f}",
            "tokens/s": f"{batch * seq / sec:,.0f}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--models", nargs="+", default=["debug", "qwen2.5-0.5b"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--ce", nargs="+", default=["auto", "torch"],
                   help="kernels.cross_entropy settings to compare (auto: chunked on CPU)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for name in args.models:
        for mode in (("train_step", "forward") if name == "debug" else ("forward",)):
            for ce in args.ce:
                rows.append(bench(name, mode, args.batch, args.seq, device, args.dtype, args.warmup,
                                  args.repeat, ce))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {where}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
