"""Megatron-LM's published runs, the planner's step-time reference: Narayanan et al. 2021, "Efficient
Large-Scale Language Model Training on GPU Clusters Using Megatron-LM" (SC21), Table 1 (A100 80GB,
seq 2048, vocab 51,200, full recomputation, no sequence parallelism, DDP, attention scores kept in
memory), with each run's micro-batch size and interleaving from Megatron-LM's
examples/sc21/run_table_1.sh (MBS; v = layers per rank / --num-layers-per-virtual-pipeline-stage, 1
where the flag is absent).

`perf.DEFAULT_EFFICIENCY` is fitted to these ten runs (tests/plan/test_megatron_table1.py holds the
planner to `perf.ERROR_BAND` of each; benchmarks/bench_planner_megatron.py prints the table).
GPT is emulated as our ModelConfig: multi-head attention, a SwiGLU MLP of I = 8h/3 rounded to 64
(GPT's 8h^2 MLP weights), tied embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

from megaqwen.models.config import ModelConfig
from megaqwen.plan.memory import GPUS, Layout
from megaqwen.plan.perf import StepEstimate, estimate_step

SEQ, VOCAB = 2048, 51_200
GPU = GPUS["a100"]


@dataclass(frozen=True)
class Run:
    params_b: float
    heads: int
    hidden: int
    layers: int
    tp: int
    pp: int
    gpus: int
    batch: int
    micro_batch: int
    virtual: int
    tflops: float
    """Achieved TFLOP/s per GPU, counting the recompute forward (the paper's eq. 3)."""

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)


TABLE1 = (
    Run(1.7, 24, 2304, 24, 1, 1, 32, 512, 16, 1, 137),
    Run(3.6, 32, 3072, 30, 2, 1, 64, 512, 16, 1, 138),
    Run(7.5, 32, 4096, 36, 4, 1, 128, 512, 16, 1, 142),
    Run(18.4, 48, 6144, 40, 8, 1, 256, 1024, 8, 1, 135),
    Run(39.1, 64, 8192, 48, 8, 2, 512, 1536, 4, 1, 138),
    Run(76.1, 80, 10240, 60, 8, 4, 1024, 1792, 2, 3, 140),
    Run(145.6, 96, 12288, 80, 8, 8, 1536, 2304, 2, 2, 148),
    Run(310.1, 128, 16384, 96, 8, 16, 1920, 2160, 1, 2, 155),
    Run(529.6, 128, 20480, 105, 8, 35, 2520, 2520, 1, 3, 163),
    Run(1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 1, 1, 163),
)


def gpt_as_model(r: Run) -> ModelConfig:
    return ModelConfig(name=f"gpt-{r.params_b}b", vocab_size=VOCAB, hidden_size=r.hidden,
                       intermediate_size=64 * round(8 * r.hidden / 3 / 64), num_layers=r.layers,
                       num_heads=r.heads, num_kv_heads=r.heads, max_position_embeddings=SEQ)


def layout(r: Run) -> Layout:
    return Layout(tp=r.tp, pp=r.pp, dp=r.dp, sequence_parallel=False,
                  pp_schedule="interleaved_1f1b" if r.virtual > 1 else "1f1b", pp_virtual_stages=r.virtual,
                  dp_mode="ddp", recompute="full", micro_batch=r.micro_batch)


def paper_flops_per_step(r: Run) -> float:
    """The paper's eq. 3: 96 B s l h^2 (1 + s / 6h + V / 16 l h), recompute forward included."""
    b, s, n, h = r.batch, SEQ, r.layers, r.hidden
    return 96 * b * s * n * h * h * (1 + s / (6 * h) + VOCAB / (16 * n * h))


def estimate(r: Run, efficiency: float | None = None) -> StepEstimate:
    kw = {} if efficiency is None else {"efficiency": efficiency}
    return estimate_step(gpt_as_model(r), layout(r), GPU, SEQ, r.batch, scores_in_memory=True, **kw)


def predicted_tflops(r: Run, efficiency: float | None = None) -> float:
    """The paper's FLOPs per step over the planner's step time, per GPU, in TFLOP/s."""
    return paper_flops_per_step(r) / estimate(r, efficiency).step_s / r.gpus / 1e12
