"""The one memory model (`megaqwen.plan.memory`, through the trainer's fit check) against the real
trainer's measured peak per rank, on six CPU runs of a 168M-parameter config.

    python benchmarks/memory_calibration.py            # the six runs, then the table (~10 min, 2 cores)
    python benchmarks/memory_calibration.py --table    # the table again from the runs' folders

Model: the debug model's 151,936-row tied vocabulary with hidden 512, 32 layers, 8 query / 2 KV heads,
intermediate 1,408: 168.0M parameters. fp32 on CPU (gloo), AdamW, 2 steps of one 256-token sequence
per rank (global batch = dp, one micro-batch per step), no checkpoints, a pre-tokenised random shard
(no tokenizer in the process). Runs, one at a time, in fresh processes (peak RSS only grows):

  single     one process
  fsdp2      FSDP2 (`parallel.dp_mode=fsdp`) at dp=2          fsdp4   at dp=4
  zero3-2    DeepSpeed ZeRO-3 (`train.engine=deepspeed`) dp=2  zero3-4 at dp=4
  zero1-2    native ZeRO-1 at dp=2: held out (not used to set any constant)
  fsdp2-accum  FSDP2 at dp=2 with 2 micro-batches per step: held out, predicted before it was run
             (FSDP2 keeps unsharded gradients until the last micro-batch's reduce-scatter)

Measured: the trainer's `peak_mem_gib_max` (the largest rank's VmHWM, metrics.jsonl). Predicted: the
fit check's terms for the same config (`train.fit_check.fit_report`), which are the planner's
`estimate_memory` terms plus the CPU runtime, split here into states (weights, grads, optimizer),
gathered parameters (FSDP/ZeRO-3 working copies), activations, transients (backward temporaries,
logits) and runtime + allocator overhead; the last column says which terms do not shrink with dp.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("CALIBRATION_DIR", "/tmp/megaqwen_memory_calibration"))
MODEL = ["model.hidden_size=512", "model.num_layers=32", "model.num_heads=8", "model.num_kv_heads=2",
         "model.intermediate_size=1408"]
RUNS = {  # name: (processes, overrides)
    "single": (1, []),
    "fsdp2": (2, ["parallel.dp=2", "parallel.dp_mode=fsdp"]),
    "fsdp4": (4, ["parallel.dp=4", "parallel.dp_mode=fsdp"]),
    "zero3-2": (2, ["parallel.dp=2", "train.engine=deepspeed", "parallel.zero_stage=3"]),
    "zero3-4": (4, ["parallel.dp=4", "train.engine=deepspeed", "parallel.zero_stage=3"]),
    "zero1-2": (2, ["parallel.dp=2", "parallel.dp_mode=zero1"]),
    "fsdp2-accum": (2, ["parallel.dp=2", "parallel.dp_mode=fsdp", "train.global_batch_size=4"]),
}
HELD_OUT = ("zero1-2", "fsdp2-accum")


def shard() -> str:
    """A pre-tokenised random shard (the trainer reads it without loading a tokenizer)."""
    from megaqwen.data.indexed import IndexedDatasetBuilder

    prefix = OUT / "data" / "random"
    if not Path(f"{prefix}.idx").exists():
        prefix.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        with IndexedDatasetBuilder(prefix) as b:
            for _ in range(400):
                b.add_document(rng.integers(4, 151_000, int(rng.integers(200, 2000))))
    return str(prefix)


def overrides(name: str, data: str) -> list[str]:
    n, extra = RUNS[name]
    base = [*MODEL, f"data.path={data}", "train.steps=2", "train.save_every=0", "train.seq_len=256",
            "train.micro_batch_size=1", f"train.global_batch_size={n}", "train.dtype=fp32",
            "train.device=cpu", "logger.wandb.enabled=false", f"train.out_dir={OUT / name}"]
    mine = {o.split("=")[0] for o in extra}
    return [o for o in base if o.split("=")[0] not in mine] + extra


def run(name: str, data: str) -> float:
    n, _ = RUNS[name]
    cmd = ([str(REPO / "launch" / "torchrun.sh"), "--nproc-per-node", str(n)] if n > 1
           else [str(Path(sys.executable).parent / "megaqwen-train")])
    t0 = time.time()
    p = subprocess.run([*cmd, *overrides(name, data)], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    (OUT / f"{name}.log").write_text(p.stdout + p.stderr)
    if p.returncode:
        raise SystemExit(f"{name} failed ({p.returncode}); see {OUT / name}.log:\n{p.stderr[-2000:]}")
    return time.time() - t0


def measured(name: str) -> float:
    return peak_gib(OUT / name)


def peak_gib(run_dir: Path) -> float:
    """A finished run's measured peak per rank, GiB: the largest `peak_mem_gib_max` in its metrics."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return max(r["peak_mem_gib_max"] for r in rows if "peak_mem_gib_max" in r)


def predicted(name: str, data: str):
    import megaqwen.train.main  # noqa: F401  (registers the config schema)
    from megaqwen.train.fit_check import fit_report
    from megaqwen.train.preflight import compose_config

    n, _ = RUNS[name]
    over = [o for o in overrides(name, data) if not o.startswith("train.out_dir")]
    cfg = compose_config([*over, f"train.out_dir={OUT / 'x'}", "train.memory_limit_gb=1000"])
    return fit_report(cfg, n)


def table(data: str) -> str:
    from megaqwen.plan.memory import GIB

    cols = {"model state": "states", "gathered parameters": "gathered params",
            "activations": "activations", "working margin": "transients", "gradient buckets": "DDP buckets",
            "runtime": "runtime + allocator"}
    head = ["run", *cols.values(), "predicted GiB", "measured GiB", "predicted / measured"]
    rows = ["| " + " | ".join(head) + " | does not shrink with dp |", "|" + "---|" * (len(head) + 1)]
    for name in RUNS:
        if not (OUT / name / "metrics.jsonl").exists():
            continue
        report = predicted(name, data)
        terms = {k: report.terms.get(k, 0.0) for k in cols}
        total, peak = report.total / GIB, measured(name)
        fixed = ", ".join(cols[k] for k in report.fixed) if RUNS[name][0] > 1 else "(one process)"
        tag = f"{name} (held out)" if name in HELD_OUT else name
        rows.append("| " + " | ".join([tag, *(f"{v / GIB:.3f}" for v in terms.values()), f"{total:.3f}",
                                        f"{peak:.3f}", f"{total / peak:.2f}"]) + f" | {fixed} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", action="store_true", help="only print the table from earlier runs")
    ap.add_argument("--only", nargs="*", default=list(RUNS), help="runs to (re)do")
    a = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    data = shard()
    if not a.table:
        for name in a.only:
            print(f"{name}: {run(name, data):.0f} s, peak {measured(name):.3f} GiB", flush=True)
    print(table(data))


if __name__ == "__main__":
    main()
