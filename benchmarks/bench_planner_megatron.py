"""The planner (`megaqwen.plan`) against Megatron-LM's published GPT runs (Narayanan et al. 2021,
"Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM", SC21, Table 1:
A100 80GB (312 TFLOP/s bf16), seq 2048, vocab 51,200, full activation recomputation, PTD-P).

Each row is the paper's model, layout (t, p, d = GPUs / (t p)), GPU count and batch, evaluated by
the planner with ddp, full recompute, micro-batch 1, under 1F1B and the interleaved 1F1B (v=2):

  paper tok/s/GPU  the paper's TFLOP/s per GPU over its FLOPs per token, which count the recompute
                   forward: 96 l h^2 + 16 l s h + 6 h V (its eq. 3 divided by B s)
  paper MFU        those tokens/s at *our* model FLOPs per token (ModelConfig.flops_per_token: 6N
                   plus causal attention, what the trainer logs as `mfu`) over 312 TFLOP/s
  ratio            planner tokens/s over the paper's (1.00 = exact; > 1 the planner is optimistic)
  eff. to match    the kernel efficiency (`efficiency`, default 0.60) at which the planner's 1F1B
                   estimate equals the paper's throughput, other terms unchanged

GPT is emulated as our ModelConfig: multi-head attention (kv heads = heads), a SwiGLU MLP of
I = 8h/3 rounded to 64 (the same 8h^2 MLP weights as GPT's 4h MLP), tied embeddings; the parameter
counts column shows it lands on the paper's sizes. CPU only, about 5 s:

    python benchmarks/bench_planner_megatron.py               # the 5 rows of benchmarks/RESULTS.md
    python benchmarks/bench_planner_megatron.py --all         # all 10 rows of the paper's Table 1
    python benchmarks/bench_planner_megatron.py --efficiency 0.65
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from megaqwen.models.config import ModelConfig
from megaqwen.plan.memory import GIB, GPUS, Layout
from megaqwen.plan.perf import DEFAULT_EFFICIENCY
from megaqwen.plan.search import Plan, evaluate

SEQ, VOCAB = 2048, 51_200
GPU = GPUS["a100"]


@dataclass(frozen=True)
class Published:
    params_b: float
    heads: int
    hidden: int
    layers: int
    tp: int
    pp: int
    gpus: int
    batch: int
    tflops: float
    """achieved TFLOP/s per GPU, counting the recompute forward (the paper's column)"""


# Narayanan et al. 2021, Table 1 (weak scaling, 1.7B -> 1T)
TABLE1 = (
    Published(1.7, 24, 2304, 24, 1, 1, 32, 512, 137),
    Published(3.6, 32, 3072, 30, 2, 1, 64, 512, 138),
    Published(7.5, 32, 4096, 36, 4, 1, 128, 512, 142),
    Published(18.4, 48, 6144, 40, 8, 1, 256, 1024, 135),
    Published(39.1, 64, 8192, 48, 8, 2, 512, 1536, 138),
    Published(76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140),
    Published(145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148),
    Published(310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155),
    Published(529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163),
    Published(1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163),
)
IN_RESULTS = (39.1, 145.6, 310.1, 529.6, 1008.0)  # the rows benchmarks/RESULTS.md compares


def gpt_as_model(r: Published) -> ModelConfig:
    return ModelConfig(name=f"gpt-{r.params_b}b", vocab_size=VOCAB, hidden_size=r.hidden,
                       intermediate_size=64 * round(8 * r.hidden / 3 / 64), num_layers=r.layers,
                       num_heads=r.heads, num_kv_heads=r.heads, max_position_embeddings=SEQ)


def paper_tokens_per_s(r: Published) -> float:
    """Per GPU: the paper's FLOP rate over its FLOPs per token (recompute forward included)."""
    n, h, s = r.layers, r.hidden, SEQ
    return r.tflops * 1e12 / (96 * n * h * h + 16 * n * s * h + 6 * h * VOCAB)


def _tok(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def plan(r: Published, m: ModelConfig, schedule: str, efficiency: float) -> Plan | str:
    d = r.gpus // (r.tp * r.pp)
    lay = Layout(tp=r.tp, pp=r.pp, dp=d, sequence_parallel=False, pp_schedule=schedule, dp_mode="ddp",
                 recompute="full", micro_batch=1)
    try:
        return evaluate(m, lay, GPU, SEQ, r.batch, efficiency)
    except ValueError:  # interleaving needs the layers divisible by pp x v
        return f"{r.layers} layers, pp x v = {r.pp * 2}"


def efficiency_to_match(p: Plan, target_tokens_per_s: float, efficiency: float) -> float:
    """Kernel efficiency at which the estimate's step time gives the target throughput."""
    st = p.step
    step = st.step_s * st.tokens_per_s / target_tokens_per_s
    comm = st.tp_comm_s + st.ep_comm_s + st.dp_exposed_s  # dp_exposed shrinks too; small here
    return st.compute_s * efficiency / ((step - comm) * (1 - st.bubble))


def rows(selected: list[Published], efficiency: float) -> list[str]:
    head = ("| model | params (ours) | t, p, d | GPUs | batch | paper TFLOP/s/GPU (% peak) "
            "| paper tok/s/GPU | paper MFU | planner 1F1B tok/s/GPU | MFU | bubble | ratio | eff. to match "
            "| planner interleaved v=2 tok/s/GPU | MFU | ratio | memory GiB (1F1B) |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in selected:
        m = gpt_as_model(r)
        ref = paper_tokens_per_s(r)
        ref_mfu = ref * m.flops_per_token(SEQ) / GPU.peak_flops
        a = plan(r, m, "1f1b", efficiency)
        b = plan(r, m, "interleaved_1f1b", efficiency) if r.pp > 1 else "pp=1"
        cells = [f"{r.params_b:g}B", f"{m.num_params() / 1e9:.1f}B",
                 f"{r.tp}, {r.pp}, {r.gpus // (r.tp * r.pp)}", str(r.gpus), str(r.batch),
                 f"{r.tflops:g} ({r.tflops / 312:.0%})", _tok(ref), f"{ref_mfu:.1%}"]
        for p, extra in ((a, True), (b, False)):
            if isinstance(p, str) or p.step is None:
                why = p if isinstance(p, str) else p.error
                cells += [f"n/a ({why})", "", ""] + (["", ""] if extra else [])
                continue
            tok = p.step.tokens_per_s / r.gpus
            cells += [_tok(tok), f"{p.step.mfu:.1%}"]
            if extra:
                cells += [f"{p.step.bubble:.1%}"]
            cells += [f"{tok / ref:.2f}"]
            if extra:
                cells += [f"{efficiency_to_match(p, ref * r.gpus, efficiency):.2f}"]
        mem = a.memory if not isinstance(a, str) else None
        cells.append(f"{mem.total / GIB:.1f}{'' if mem.fits else ' (does not fit)'}" if mem else "")
        out.append("| " + " | ".join(cells) + " |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--all", action="store_true", help="all 10 rows of Table 1, not only RESULTS.md's 5")
    ap.add_argument("--efficiency", type=float, default=DEFAULT_EFFICIENCY,
                    help=f"planner kernel efficiency (default {DEFAULT_EFFICIENCY})")
    args = ap.parse_args()
    if not 0 < args.efficiency <= 1:
        raise SystemExit(f"--efficiency={args.efficiency} must be in (0, 1]")
    selected = [r for r in TABLE1 if args.all or r.params_b in IN_RESULTS]
    print(f"planner (efficiency {args.efficiency:.2f}, ddp, full recompute, micro-batch 1) vs Megatron-LM "
          f"(Narayanan et al. 2021, Table 1), {GPU.name}, seq {SEQ}, vocab {VOCAB:,}")
    print("\n".join(rows(selected, args.efficiency)))


if __name__ == "__main__":
    main()
