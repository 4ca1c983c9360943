"""Enumerate layouts for a GPU count, keep those that fit, rank them by estimated step time."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from megaqwen.models.config import ModelConfig
from megaqwen.plan.memory import GPU, Layout, MemoryEstimate, estimate_memory
from megaqwen.plan.perf import DEFAULT_EFFICIENCY, StepEstimate, estimate_step


@dataclass
class Plan:
    layout: Layout
    memory: MemoryEstimate
    step: StepEstimate | None
    """None when the batch cannot be split this way (the reason is in `error`)."""
    error: str = ""


def evaluate(m: ModelConfig, lay: Layout, gpu: GPU, seq: int, global_batch: int,
             efficiency: float = DEFAULT_EFFICIENCY) -> Plan:
    """Memory and step estimate of one layout (ValueError for a layout the model cannot take)."""
    lay.validate(m)
    if global_batch % (lay.micro_batch * lay.dp):
        raise ValueError(f"global_batch={global_batch} is not divisible by micro_batch x dp = "
                         f"{lay.micro_batch} x {lay.dp}")
    microbatches = global_batch // (lay.micro_batch * lay.dp)
    mem = estimate_memory(m, lay, seq, microbatches, device_bytes=gpu.memory_bytes)
    try:
        step = estimate_step(m, lay, gpu, seq, global_batch, efficiency)
    except ValueError as e:  # the pipeline needs more micro-batches than the batch gives
        return Plan(lay, mem, None, str(e))
    return Plan(lay, mem, step)


def _divisors(n: int, cap: int) -> list[int]:
    return [d for d in (1, 2, 4, 8, 16, 32, 64) if d <= cap and n % d == 0]


def candidates(m: ModelConfig, gpus: int, seq: int, global_batch: int) -> Iterator[Layout]:
    """tp within a node (1-8, sequence parallel on), pp up to 16 (1F1B, interleaved with v=2, ZB-V),
    cp up to 8 (only when seq >= 8K), ep over the MoE experts, dp the rest; ddp | zero1 | fsdp;
    every recompute mode; micro-batches of 1, 2, 4."""
    for tp in _divisors(gpus, 8):
        for pp in _divisors(gpus // tp, 16):
            for cp in _divisors(gpus // (tp * pp), 8 if seq >= 8192 else 1):
                dp = gpus // (tp * pp * cp)
                eps = _divisors(dp * cp, 64) if m.is_moe else [1]
                for ep in eps:
                    for sched in (("1f1b", "interleaved_1f1b", "zbv") if pp > 1 else ("1f1b",)):
                        for mode in ("ddp", "zero1", "fsdp"):
                            if pp > 1 and mode == "fsdp":
                                continue  # FSDP re-gathers per micro-batch under pipelining: skip
                            if (ep > 1 and mode == "zero1") or (m.is_moe and cp > 1):
                                continue  # the trainer refuses these (parallel.setup.check_layout)
                            for rc in ("none", "selective", "full"):
                                for mb in (1, 2, 4):
                                    if global_batch % (mb * dp):
                                        continue
                                    lay = Layout(tp=tp, pp=pp, cp=cp, ep=ep, dp=dp,
                                                 sequence_parallel=tp > 1, pp_schedule=sched,
                                                 dp_mode=mode, recompute=rc, micro_batch=mb)
                                    try:
                                        lay.validate(m)
                                    except ValueError:
                                        continue
                                    yield lay


def search(m: ModelConfig, gpus: int, gpu: GPU, seq: int, global_batch: int,
           efficiency: float = DEFAULT_EFFICIENCY) -> list[Plan]:
    """Layouts that fit, fastest first (ties: less memory)."""
    if gpus < 1:
        raise ValueError(f"gpus={gpus} must be >= 1")
    out = []
    for lay in candidates(m, gpus, seq, global_batch):
        plan = evaluate(m, lay, gpu, seq, global_batch, efficiency)
        if plan.step is not None and plan.memory.fits:
            out.append(plan)
    out.sort(key=lambda p: (p.step.step_s, p.memory.total))
    return out
