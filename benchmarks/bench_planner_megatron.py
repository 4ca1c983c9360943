"""The planner (`megaqwen.plan`) against Megatron-LM's published GPT runs (Narayanan et al. 2021,
SC21, Table 1; the runs, their micro-batches and interleaving: `megaqwen.plan.megatron`).

For each run, the planner's step estimate on the run's own layout (tp, pp, dp, micro-batch,
interleaving, ddp, full recompute, scores in memory as in 2021), the paper's FLOPs per step over that
step time per GPU against the published TFLOP/s, the estimate's bubble and MFU (our definition: 6N +
causal attention), and the memory estimate. The large-GEMM efficiency (`--efficiency`, default
`perf.DEFAULT_EFFICIENCY`) is fitted to these ten runs; tests/plan/test_megatron_table1.py holds
each within `perf.ERROR_BAND`. CPU only, a few seconds:

    python benchmarks/bench_planner_megatron.py
    python benchmarks/bench_planner_megatron.py --efficiency 0.65
"""

from __future__ import annotations

import argparse

from megaqwen.plan.megatron import (
    GPU,
    SEQ,
    TABLE1,
    VOCAB,
    estimate,
    gpt_as_model,
    layout,
    paper_flops_per_step,
)
from megaqwen.plan.memory import GIB, estimate_memory
from megaqwen.plan.perf import DEFAULT_EFFICIENCY, ERROR_BAND


def rows(efficiency: float) -> list[str]:
    head = ("| model | params (ours) | t, p, d | MBS, v | GPUs | batch | paper TFLOP/s/GPU "
            "| planner TFLOP/s/GPU | error | bubble | MFU | memory GiB |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in TABLE1:
        m, lay = gpt_as_model(r), layout(r)
        st = estimate(r, efficiency)
        pred = paper_flops_per_step(r) / st.step_s / r.gpus / 1e12
        micro = r.batch // (r.micro_batch * r.dp)
        mem = estimate_memory(m, lay, SEQ, micro, act_bytes=2)
        out.append(f"| {r.params_b:g}B | {m.num_params() / 1e9:.1f}B | {r.tp}, {r.pp}, {r.dp} | "
                   f"{r.micro_batch}, {r.virtual} | {r.gpus} | {r.batch} | {r.tflops:g} | {pred:.1f} | "
                   f"{pred / r.tflops - 1:+.1%} | {st.bubble:.1%} | {st.mfu:.1%} | {mem.total / GIB:.1f} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--efficiency", type=float, default=DEFAULT_EFFICIENCY,
                    help=f"large-GEMM efficiency e_max (default {DEFAULT_EFFICIENCY}, fitted to these runs)")
    args = ap.parse_args()
    if not 0 < args.efficiency <= 1:
        raise SystemExit(f"--efficiency={args.efficiency} must be in (0, 1]")
    print(f"planner (e_max {args.efficiency:.2f}, band ±{ERROR_BAND:.0%}) vs Megatron-LM (Narayanan et al. "
          f"2021, Table 1), {GPU.name}, seq {SEQ}, vocab {VOCAB:,}")
    print("\n".join(rows(args.efficiency)))


if __name__ == "__main__":
    main()
