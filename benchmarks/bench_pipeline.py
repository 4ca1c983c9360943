"""Pipeline schedules: step time, bubble (theoretical and measured) and per-stage peak memory.

Each row is a real training run of the trainer (`launch/torchrun.sh`, one process per pipeline
rank, the shipped sample corpus), read back from its metrics.jsonl: median step time over the steps
after the first (which includes start-up and the schedule's set-up), the schedule's theoretical
bubble, the measured one (1 - time in stage compute / step time, mean over pp ranks) and each pp
rank's peak memory (CPU: VmHWM; CUDA: max allocated). The baseline row is pp=1 on one process with
the same model, batch and micro-batches; "vs pp=1" is its step time over the row's.

    python benchmarks/bench_pipeline.py                                  # CPU: debug model, pp=2
    python benchmarks/bench_pipeline.py --model qwen2.5-0.5b --layers 24 --seq 128 --steps 3
    # GPUs (one node, 8 GPUs: pp=8 of a 7B-class model; bf16, flash attention when installed):
    python benchmarks/bench_pipeline.py --model qwen2.5-7b --pp 8 --seq 4096 --global-batch 64 \\
        --steps 10 --device cuda --extra train.dtype=bf16 kernels=auto
Prints a markdown table (paste into benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("zero_bubble", 2), ("zbv", 2),
             ("dualpipev", 2)]


def run(args: argparse.Namespace, pp: int, schedule: str | None, out: Path) -> dict:
    overrides = [f"model={args.model}", f"model.num_layers={args.layers}", f"train.seq_len={args.seq}",
                 f"train.global_batch_size={args.global_batch}", "train.micro_batch_size=1",
                 f"train.steps={args.steps}", "train.save_every=0", "train.warmup_steps=1",
                 f"train.device={args.device}", "logger.wandb.enabled=false", f"train.out_dir={out}",
                 "data.path=sample", *args.extra]
    if pp > 1:
        overrides += [f"parallel.pp={pp}", f"parallel.pp_schedule={schedule}"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    if pp == 1:
        cmd = [sys.executable, "-m", "megaqwen.train.main", *overrides]
    else:
        cmd = ["bash", str(ROOT / "launch/torchrun.sh"), "--nproc-per-node", str(pp), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{schedule or 'pp=1'} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    timed = rows[1:] or rows
    res = {"step_s": statistics.median(r["step_time_s"] for r in timed), "loss": rows[-1]["loss"]}
    if pp > 1:
        res["theory"] = rows[-1]["pp_bubble_theory"]
        res["measured"] = statistics.median(r["pp_bubble_measured"] for r in timed)
        res["peaks"] = [max(r[f"pp_rank{i}_peak_mem_gib"] for r in rows) for i in range(pp)]
    else:
        res["peaks"] = [max(r["peak_mem_gib"] for r in rows)]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="debug")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--global-batch", type=int, default=8, help="micro-batches per step (micro-batch 1)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--schedules", default=",".join(s for s, _ in SCHEDULES))
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        base = run(args, 1, None, Path(d) / "pp1")
        print(f"model {args.model} ({args.layers} layers), seq {args.seq}, {args.global_batch} micro-batches "
              f"of 1 per step, pp={args.pp}, device {args.device}\n")
        print("| schedule | step s | vs pp=1 | bubble theory | bubble measured | peak GiB per pp rank "
              "| loss |")
        print("|---|---|---|---|---|---|---|")
        print(f"| pp=1 (one process) | {base['step_s']:.3f} | 1.00 | - | - | {base['peaks'][0]:.2f} | "
              f"{base['loss']:.4f} |")
        for name in args.schedules.split(","):
            r = run(args, args.pp, name, Path(d) / name)
            peaks = " / ".join(f"{p:.2f}" for p in r["peaks"])
            print(f"| {name} | {r['step_s']:.3f} | {base['step_s'] / r['step_s']:.2f} | "
                  f"{100 * r['theory']:.1f}% | "
                  f"{100 * r['measured']:.1f}% | {peaks} | {r['loss']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
