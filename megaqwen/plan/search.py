"""Enumerate layouts for a GPU count, keep those the trainer accepts (its own validation,
`parallel.setup.validate_layout`) and that fit, rank them by estimated step time; when none is left,
say whether memory or divisibility ruled them out."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from megaqwen.models.config import ModelConfig
from megaqwen.plan.memory import GPU, Layout, MemoryEstimate, estimate_memory, routed_experts
from megaqwen.plan.perf import DEFAULT_EFFICIENCY, ERROR_BAND, StepEstimate, estimate_step


@dataclass
class Plan:
    layout: Layout
    memory: MemoryEstimate
    step: StepEstimate | None
    """None when the batch cannot be split this way (the reason is in `error`)."""
    error: str = ""


def evaluate(m: ModelConfig, lay: Layout, gpu: GPU, seq: int, global_batch: int,
             efficiency: float = DEFAULT_EFFICIENCY) -> Plan:
    """Memory and step estimate of one layout (ValueError for a layout the trainer refuses)."""
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


@dataclass
class Rejected:
    """Why the search dropped candidate layouts."""

    batch_dp: set[int] = field(default_factory=set)
    """dp degrees the global batch does not split over (in micro-batches of 1, 2 or 4)."""
    refused: Counter[str] = field(default_factory=Counter)
    """The trainer's refusal messages (heads, layers, experts, schedules ... do not divide), counted."""
    memory: int = 0
    """Layouts the trainer accepts that need more than 90% of the GPU's memory."""

    def explain(self, gpus: int, global_batch: int) -> str:
        """One line: why no layout of `gpus` GPUs is left."""
        if self.memory:
            return (f"no layout fits in memory ({self.memory} layouts the trainer accepts need more than 90% "
                    "of a GPU): more GPUs, a shorter sequence or a smaller global batch")
        why = []
        if self.batch_dp:
            dps = sorted(self.batch_dp)
            pow2 = "" if gpus & (gpus - 1) == 0 else " or a power-of-two GPU count"
            why.append(f"global_batch={global_batch} does not split into micro-batches over dp = "
                       f"{', '.join(map(str, dps))} (the data-parallel degrees {gpus} GPUs leave); use a "
                       f"global batch that is a multiple of {dps[0]}{pow2}")
        if self.refused:
            msg, n = self.refused.most_common(1)[0]
            why.append(f"{sum(self.refused.values())} layouts the trainer refuses, most often ({n}x): {msg}")
        return (f"no layout of {gpus} GPUs fits, and memory is not why: the sizes do not divide: "
                + "; ".join(why or ["no candidate layouts"]))


def trainer_refusal(m: ModelConfig, lay: Layout, seq: int, microbatches: int) -> str | None:
    """Why the trainer would refuse `lay` (None: it accepts it): `Layout.validate`, which asks the
    trainer's own validation, so the planner never proposes a layout the trainer rejects."""
    try:
        lay.validate(m, seq, microbatches)
    except ValueError as e:
        return str(e).split(": ", 1)[1]  # without the "layout Layout(...)" prefix: counted by message
    return None


def _divisors(n: int, cap: int) -> list[int]:
    return [d for d in (1, 2, 4, 8, 16, 32, 64) if d <= cap and n % d == 0]


def candidates(m: ModelConfig, gpus: int, seq: int, global_batch: int,
               rejected: Rejected | None = None) -> Iterator[Layout]:
    """tp within a node (1-8, sequence parallel on), pp up to 16 (1F1B, interleaved with v=2, ZB-V),
    cp up to 8 (only when seq >= 8K), ep over the MoE experts (a model whose spec flags routed-expert
    tensors) with the experts split over tp (etp = tp) or, for tp > 1, whole with the tp group's rows
    dispatched in tp parts (etp = 1: ep up to dp x cp x tp), dp the rest; ddp | zero1 | fsdp (under
    pipelining too: the step estimate counts FSDP's gathers per micro-batch); every recompute mode;
    micro-batches of 1, 2, 4: those the trainer accepts (the others counted in `rejected`)."""
    from megaqwen.parallel.setup import accumulation_steps

    rejected = rejected if rejected is not None else Rejected()
    for tp in _divisors(gpus, 8):
        for pp in _divisors(gpus // tp, 16):
            for cp in _divisors(gpus // (tp * pp), 8 if seq >= 8192 else 1):
                dp = gpus // (tp * pp * cp)
                moe = routed_experts(m) is not None
                etps = (-1, 1) if moe and tp > 1 else (-1,)
                for etp, ep in [(e, ep) for e in etps
                                for ep in (_divisors(dp * cp * (tp if e == 1 else 1), 64) if moe else [1])]:
                    for sched in (("1f1b", "interleaved_1f1b", "zbv") if pp > 1 else ("1f1b",)):
                        for mode in ("ddp", "zero1", "fsdp"):
                            for rc in ("none", "selective", "full"):
                                for mb in (1, 2, 4):
                                    try:
                                        steps = accumulation_steps(global_batch, mb, dp)
                                    except ValueError:
                                        rejected.batch_dp.add(dp)
                                        continue
                                    lay = Layout(tp=tp, pp=pp, cp=cp, ep=ep, dp=dp, etp=etp,
                                                 sequence_parallel=tp > 1, pp_schedule=sched,
                                                 dp_mode=mode, recompute=rc, micro_batch=mb)
                                    why = trainer_refusal(m, lay, seq, steps)
                                    if why is not None:
                                        rejected.refused[why] += 1
                                        continue
                                    yield lay


def search(m: ModelConfig, gpus: int, gpu: GPU, seq: int, global_batch: int,
           efficiency: float = DEFAULT_EFFICIENCY, rejected: Rejected | None = None) -> list[Plan]:
    """Layouts that fit, fastest first (ties: less memory); why the others were dropped goes into
    `rejected`."""
    if gpus < 1:
        raise ValueError(f"gpus={gpus} must be >= 1")
    rejected = rejected if rejected is not None else Rejected()
    out = []
    for lay in candidates(m, gpus, seq, global_batch, rejected):
        plan = evaluate(m, lay, gpu, seq, global_batch, efficiency)
        if plan.step is None:
            rejected.refused[plan.error] += 1
        elif not plan.memory.fits:
            rejected.memory += 1
        else:
            out.append(plan)
    out.sort(key=lambda p: (p.step.step_s, p.memory.total))
    return out


def tied(plans: list[Plan], band: float = ERROR_BAND) -> list[int]:
    """Rank of each plan (fastest first), equal for plans whose step times lie within `band` of the
    first plan of their group: the model cannot order them (its error band, `perf.ERROR_BAND`)."""
    ranks, lead = [], None
    for i, p in enumerate(plans):
        if p.step is None:
            ranks.append(i + 1)
            continue
        if lead is None or p.step.step_s > lead[1] * (1 + band):
            lead = (i + 1, p.step.step_s)
        ranks.append(lead[0])
    return ranks
