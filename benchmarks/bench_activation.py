"""Activation recomputation and torch.compile: peak memory, step time and losses per mode.

Each mode runs in a fresh process (peak RSS only ever grows within one): the same model, seed and
batch; forward + backward + AdamW; the first `--warmup` steps (compilation included) are not
timed. "peak act. MiB" is the peak resident memory during the timed steps minus the resident
memory after the model, its gradients, optimizer state and batch existed (on CUDA: torch.cuda peak allocated
minus allocated before the steps). Losses of every mode are compared with `none`.

    python benchmarks/bench_activation.py                                   # CPU defaults
    python benchmarks/bench_activation.py --device cuda --layers 24 --seq 4096 --batch 4 --dtype bf16
Prints a markdown table (paste into benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

MODES = [("none", False), ("selective", False), ("full", False), ("none", True)]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_mode(args: argparse.Namespace, recompute: str, compile_: bool) -> dict:
    from megaqwen.models.config import get_config
    from megaqwen.models.spec import get_spec
    from megaqwen.parallel.activation import apply_compile, apply_recompute
    from megaqwen.parallel.materialize import materialize
    from megaqwen.parallel.shards import ShardMap

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = get_config(args.model, num_layers=args.layers, vocab_size=args.vocab)
    spec = get_spec(cfg)
    model = spec.build(cfg, device="meta")
    apply_recompute(spec.layers(model), recompute, spec.selective_recompute)
    if compile_:
        apply_compile(spec.layers(model))
    materialize(model, ShardMap(), device, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else None
    losses, times = [], []
    base = peak = 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated() / 2**20
            else:
                base = _rss_mib()
        t0 = time.perf_counter()
        with autocast or torch.autocast(device.type, enabled=False):
            loss = model(ids[:, :-1], labels=ids[:, 1:]).mean()
        loss.backward()
        if step >= args.warmup and device.type == "cpu":
            peak = max(peak, _rss_mib())  # after backward's start the saved activations are all held
        opt.step()
        opt.zero_grad(set_to_none=False)  # gradients stay allocated: counted in the baseline
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = max(peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"recompute": recompute, "compile": compile_, "losses": losses,
            "peak_act_mib": peak - base, "step_s": sorted(times)[len(times) // 2]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b", help="config name (layers overridden by --layers)")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers")
    ap.add_argument("--vocab", type=int, default=8192,
                    help="vocabulary rows (small by default so activations, not the 151,936-row head, "
                         "dominate memory)")
    ap.add_argument("--batch", type=int, default=2, help="sequences per step")
    ap.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (compilation happens here)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--dtype", default="fp32", help="fp32 | bf16 (autocast)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op CPU threads")
    ap.add_argument("--one", nargs=2, metavar=("RECOMPUTE", "COMPILE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_mode(args, args.one[0], args.one[1] == "1")))
        return
    rows = []
    for recompute, compile_ in MODES:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--one", recompute, str(int(compile_))]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"  ran recompute={recompute} compile={compile_}", file=sys.stderr)
    ref = rows[0]
    print(f"\n{args.model} x {args.layers} layers, batch {args.batch} x {args.seq} tokens, {args.dtype}, "
          f"{args.device}, {args.threads} threads\n")
    print("| recompute | compile | peak act. MiB | vs none | step (s) | vs none | max loss rel. diff |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        diff = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], ref["losses"]))
        print(f"| {r['recompute']} | {r['compile']} | {r['peak_act_mib']:.0f} | "
              f"{r['peak_act_mib'] / ref['peak_act_mib']:.2f}x | {r['step_s']:.2f} | "
              f"{r['step_s'] / ref['step_s']:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
