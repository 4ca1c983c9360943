"""Will the run fit? Before any model is built, the planner's per-rank memory estimate for the run's
layout (`megaqwen.plan.memory.estimate_memory`) against the memory one process may use; a run that
cannot fit is refused with the estimate's terms and the changes that would make it fit.

Memory one process may use: `train.memory_limit_gb` when set, else detected:
  CUDA  free memory of this rank's GPU (LOCAL_RANK; one GPU per process), plus what this process's
        caching allocator already holds (an earlier stage of a chain, run in the same process);
  CPU   MemAvailable, or less where a cgroup limit (v2 memory.max, v1 memory.limit_in_bytes) leaves
        less (limit - working set), shared equally by this node's processes: LOCAL_WORLD_SIZE, else
        the world size (launch/torchrun.sh checks its one node before starting any rank).
A run fits when the estimate is at most 90% of that (the planner's `MemoryEstimate.fits` rule: allocator
fragmentation, CUDA context, NCCL buffers). A CPU process also holds its runtime (RUNTIME_BYTES:
interpreter, torch, the trainer's modules and what its first step faults in), the Qwen tokenizer where
it loads one (TOKENIZER_BYTES) and, with train.async_save, a host copy of its weights and optimizer
state; DeepSpeed offload moves state off the GPU. Against the whole CPU trainer's measured peak resident
set (debug model, the four runs of benchmarks/fit_check_runtime.py) the total is 0.93-1.07x
(tests/train/test_fit_check.py holds two of them within 15%).

One memory model: the planner's (`megaqwen.plan.memory`), so `megaqwen-plan` proposes per-rank
memory this check computes for the same layout (tests/train/test_fit_check.py); `megaqwen-stages`
runs the same `fit_report` before each stage of a chain. It counts parameters exactly per rank from
the model spec's shapes (tp/pp/ep pieces, FSDP chunks, DeepSpeed stages) and pipeline micro-batches
in flight; its backward margin (1.5 layers) was fitted to measured fp32 CPU peaks (within 10%), its
sharded-root copies to four dp=2/4 FSDP2 and ZeRO-3 runs of a 168M config (benchmarks/
memory_calibration.py: seven runs, all within 6%, two of them held out). The log line names the
terms that more data-parallel ranks would not shrink (`fixed_terms`).
Uneven `parallel.pp_layers` are counted as if every stage held the largest one (an upper bound).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from megaqwen.models.config import ModelConfig
from megaqwen.plan.memory import GIB, Layout, estimate_memory

log = logging.getLogger(__name__)

HEADROOM = 0.9
"""Fraction of the available memory a run may plan to use (as `MemoryEstimate.fits`)."""
RUNTIME_BYTES = 0.47 * GIB
"""A CPU trainer's own resident memory besides its model, state and activations: the interpreter,
torch, the trainer's modules and data index before the model is built, plus what its first steps
fault in (kernels' code pages, thread pools, allocator arenas, batches, metrics). Measured peak minus
the planner's estimate, debug model on a pre-tokenised shard at 256 and 8,192 tokens per micro-batch:
0.49-0.50 and 0.43-0.44 GiB (benchmarks/fit_check_runtime.py)."""
TOKENIZER_BYTES = 0.17 * GIB
"""The Qwen tokenizer (its byte-level BPE in `tokenizers`, plus `transformers`' wrapper) where the
trainer may load it: data.path=sample or sample:NAME (the shipped data, tokenised by the run's rank 0
on first use; counted on every rank, an upper bound) and GRPO (its rollouts detokenise and score).
Measured as the same two runs' difference with data.path=sample: 0.19-0.20 and 0.12-0.14 GiB more."""
MEMINFO = "/proc/meminfo"
CGROUP_FILES = (  # (limit, usage, stat, reclaimable page-cache key): v2, then v1
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat",
     "inactive_file"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
     "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file"),
)


@dataclass(frozen=True)
class RunShape:
    """What the estimate depends on: model, layout, batch, precision and where state lives."""

    model: ModelConfig
    layout: Layout
    seq_len: int
    global_batch: int
    act_bytes: int
    cpu: bool
    async_save: bool = False
    deepspeed: bool = False
    offload_optimizer: bool = False
    offload_params: bool = False
    reference: bool = False
    """The objective holds a frozen reference model (`megaqwen.train.reference`): fp32 weights
    sharded like the policy's (whole per dp rank under DeepSpeed, which it does not partition)."""
    tokenizer: bool = False
    """The process may load the Qwen tokenizer (TOKENIZER_BYTES; counted for CPU runs, with the runtime)."""

    def terms(self) -> dict[str, float]:
        """Bytes per process, by term, on the most loaded pipeline rank."""
        lay = self.layout
        micro = max(1, self.global_batch // (lay.micro_batch * lay.dp))
        e = estimate_memory(self.model, lay, self.seq_len, micro, act_bytes=self.act_bytes)
        gpu = not self.cpu  # DeepSpeed offload keeps these in host memory, off the GPU
        state = e.grads + (0 if gpu and self.offload_optimizer else e.optimizer) + \
            (0 if gpu and self.offload_params else e.weights)
        out = {"model state": state, "activations": e.activations, "working margin": e.margin}
        if e.gathered:
            out["gathered parameters"] = e.gathered
        if e.buffers:
            out["gradient buckets"] = e.buffers
        if self.reference:
            out["reference model"] = 4.0 * e.params  # this rank's parameter elements, fp32
        if self.cpu:
            out["runtime"] = RUNTIME_BYTES
            if self.tokenizer:
                out["tokenizer"] = TOKENIZER_BYTES
            if self.async_save:
                out["async checkpoint copy"] = e.weights + e.optimizer
        return out

    def with_(self, **layout_changes) -> RunShape:
        return dataclasses.replace(self, layout=dataclasses.replace(self.layout, **layout_changes))


@dataclass
class FitReport:
    """The estimate by term, against the memory one process may use."""

    name: str
    terms: dict[str, float]
    available: float
    where: str
    advice: list[str] = field(default_factory=list)
    fixed: list[str] = field(default_factory=list)
    """Terms that would not shrink with twice the data-parallel ranks (`fixed_terms`)."""

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    @property
    def fits(self) -> bool:
        return self.total <= HEADROOM * self.available

    def summary(self) -> str:
        parts = ", ".join(f"{k} {_gib(v)}" for k, v in self.terms.items())
        return (f"model={self.name} needs about {_gib(self.total)} GiB per process ({parts}) "
                f"{'of the' if self.fits else 'but'} {_gib(self.available)} GiB "
                f"{'' if self.fits else 'is '}available ({self.where}; {HEADROOM:.0%} of it may be planned)")

    def fixed_note(self) -> str:
        """Which terms do not shrink with dp, and how much of the total they are."""
        if not self.fixed:
            return ""
        gib = sum(self.terms[k] for k in self.fixed)
        return (f"; not shrinking with more data-parallel ranks: {', '.join(self.fixed)} "
                f"({_gib(gib)} of {_gib(self.total)} GiB)")

    def message(self) -> str:
        return (f"{self.summary()}: {'; '.join(self.advice)} (train.memory_limit_gb sets the memory per "
                "process, train.fit_check=false skips this check)")


def _gib(n: float) -> str:
    return f"{n / GIB:.1f}" if n >= GIB else f"{n / GIB:.2f}"


def run_shape(cfg, world_size: int) -> RunShape:
    """The RunShape of a training Config (megaqwen.train.config.Config) on `world_size` processes."""
    from megaqwen.parallel.dims import ParallelDims

    p, t = cfg.parallel, cfg.train
    dims = ParallelDims.from_config(p, world_size)
    device = _device(cfg, world_size)
    bf16 = t.dtype == "bf16" or (t.dtype == "auto" and device.type == "cuda" and _bf16_gpu())
    mode = p.dp_mode
    if t.engine == "deepspeed":  # ZeRO accounting for stages 2-3 (compute-dtype copies + 12 bytes)
        mode = f"zero{p.zero_stage}" if p.zero_stage > 1 else "zero1"
    m, virtual = cfg.model, p.pp_virtual_stages
    if p.pp_layers is not None:  # every stage counted as the largest: an upper bound
        virtual = len(p.pp_layers) // p.pp
        m = dataclasses.replace(m, num_layers=max(p.pp_layers) * len(p.pp_layers))
    lay = Layout(tp=dims.tp, pp=dims.pp, cp=dims.cp, ep=dims.ep, dp=dims.dp, etp=dims.etp,
                 sequence_parallel=p.sequence_parallel, pp_schedule=p.pp_schedule,
                 pp_virtual_stages=virtual, dp_mode=mode, recompute=p.recompute,
                 micro_batch=t.micro_batch_size, fsdp_reshard_after_forward=p.fsdp_reshard_after_forward,
                 fsdp_keep_gathered=p.fsdp_keep_gathered)
    from megaqwen.train.data_check import is_sample
    from megaqwen.train.objectives import objective_for

    return RunShape(m, lay, t.seq_len, t.global_batch_size, 2 if bf16 else 4, device.type == "cpu",
                    t.async_save, t.engine == "deepspeed", t.engine == "deepspeed" and p.offload_optimizer,
                    t.engine == "deepspeed" and p.offload_params, _holds_reference(cfg, objective_for(cfg)),
                    is_sample(cfg.data.path) or t.objective == "grpo")


def _holds_reference(cfg, objective) -> bool:
    """A reference model held through training (`dpo.precompute_reference` frees it before the first
    step, while the optimizer state does not exist yet: below the training peak)."""
    dpo = getattr(cfg, "dpo", None)
    return objective.needs_reference and not (cfg.train.objective == "dpo" and dpo is not None
                                              and dpo.precompute_reference)


def fit_report(cfg, world_size: int) -> FitReport:
    """The estimate of a training Config against the memory one process may use, with advice when it
    does not fit. The start-up fit check (`check_fit`) and the stage memory check of `megaqwen-stages`
    (before each stage of a chain) are this one call."""
    shape = run_shape(cfg, world_size)
    if cfg.train.memory_limit_gb > 0:
        available, where = cfg.train.memory_limit_gb * GIB, "train.memory_limit_gb"
    else:
        available, where = available_memory(cfg, world_size)
    report = FitReport(cfg.model.name, shape.terms(), available, where, fixed=fixed_terms(shape))
    if not report.fits:
        report.advice = advice(shape, available)
    return report


def check_fit(cfg, world_size: int) -> FitReport | None:
    """Refuse (ValueError) a run whose estimate exceeds the memory one process may use; None when
    train.fit_check is off."""
    if not cfg.train.fit_check:
        return None
    report = fit_report(cfg, world_size)
    if not report.fits:
        raise ValueError(report.message())
    fixed = sum(report.terms[k] for k in report.fixed)
    if run_shape(cfg, world_size).layout.dp > 1 and fixed > 0.5 * report.total:
        # most of it would not shrink on more data-parallel ranks: say so where the run starts
        log.warning("%s: fits%s", report.summary(), report.fixed_note())
    else:
        log.info("%s: fits%s", report.summary(), report.fixed_note())
    return report


def fixed_terms(shape: RunShape) -> list[str]:
    """Terms of `shape` that the same run on twice the data-parallel ranks would not shrink (by 1%):
    the runtime, activations and working margin always; gathered parameters and gradient buckets
    (a sharded or bucketed dp_mode's own); the model state under ddp, or FSDP2's unsharded gradients
    during accumulation. Empty when the doubled layout is one the trainer refuses."""
    try:
        twice = shape.with_(dp=2 * shape.layout.dp).terms()
    except ValueError:
        return []
    return [k for k, v in shape.terms().items() if v > 0 and twice.get(k, 0.0) >= 0.99 * v]


def advice(shape: RunShape, available: float) -> list[str]:
    """Single changes that bring the estimate under HEADROOM x `available`, aimed at the largest term
    (model state, or activations with the working margin); what reduces it most when none does."""
    t = shape.terms()
    state_bound = t["model state"] >= t["activations"] + t["working margin"]
    lay, budget = shape.layout, HEADROOM * available
    unit = "nodes like this one" if shape.cpu else "GPUs"
    tries: list[tuple[str, RunShape]] = []
    if state_bound:
        shard = "parallel.zero_stage=3" if shape.deepspeed else "parallel.dp_mode=fsdp"
        sharded = "zero3" if shape.deepspeed and shape.act_bytes == 2 else "fsdp"  # as run_shape maps it
        if lay.dp > 1 and lay.dp_mode != sharded:
            tries.append((f"{shard} (the same processes share the model state)",
                          shape.with_(dp_mode=sharded)))
        for k in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):  # more data-parallel ranks, sharded state
            big = shape.with_(dp=lay.dp * k, dp_mode=sharded)
            if (total := _total(big)) is not None and total <= budget:
                n = k if shape.cpu else big.layout.world
                tries.append((f"{shard} over {n} {unit} (dp={lay.dp * k})", big))
                break
        if not shape.cpu:  # on one CPU node more ranks share the same RAM: tp/pp do not help there
            tries += [(f"parallel.tp={k} ({lay.world // lay.tp * k} GPUs)", shape.with_(tp=k))
                      for k in (2, 4, 8) if k > lay.tp]
            tries += [(f"parallel.pp={k} ({lay.world // lay.pp * k} GPUs)", shape.with_(pp=k))
                      for k in (2, 4, 8, 16) if k > lay.pp]
    else:
        if lay.recompute == "none":
            tries.append(("parallel.recompute=selective", shape.with_(recompute="selective")))
        if lay.recompute != "full":
            tries.append(("parallel.recompute=full", shape.with_(recompute="full")))
        for mb in range(lay.micro_batch - 1, 0, -1):
            if shape.global_batch % mb == 0:
                tries.append((f"train.micro_batch_size={mb}", shape.with_(micro_batch=mb)))
        if not shape.cpu:
            tries += [(f"parallel.cp={k} ({lay.world // lay.cp * k} GPUs)", shape.with_(cp=k))
                      for k in (2, 4, 8, 16) if k > lay.cp and shape.seq_len % (2 * k) == 0]
    scored = [(text, total) for text, s in tries if (total := _total(s)) is not None]
    fitting = _first_per_knob([text for text, total in scored if total <= budget])
    if fitting:
        return ["fits with " + " or with ".join(fitting[:3])]
    better = _first_per_knob([text for total, text in sorted((total, text) for text, total in scored
                                                              if total < sum(t.values()))])
    lead = f"no single change fits; the largest term is the {'model state' if state_bound else 'activations'}"
    if not better:
        return [lead + (": use more memory per process (a larger GPU, more nodes) or a smaller model"
                        if state_bound else ": use a larger device or a shorter train.seq_len")]
    totals = dict(scored)
    return [lead + ", reduced most by " + ", ".join(f"{text} (about {_gib(totals[text])} GiB)"
                                                   for text in better[:3])]



def _total(shape: RunShape) -> float | None:
    """The estimate's total, or None for a layout the model cannot take."""
    try:
        return sum(shape.terms().values())
    except ValueError:
        return None


def _first_per_knob(texts: list[str]) -> list[str]:
    """Keep the first (least disruptive) fitting value of each setting: cp=2 rather than cp=2, 4, 8."""
    seen, out = set(), []
    for text in texts:
        knob = text.split("=")[0]
        if knob not in seen:
            seen.add(knob)
            out.append(text)
    return out


def _device(cfg, world_size: int):
    """This rank's device as the trainer picks it (`parallel.setup.start_settings`), before any group."""
    from megaqwen.parallel.setup import start_settings

    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if world_size > 1 else 0
    return start_settings(cfg.parallel, cfg.train.device, world_size, local_rank)[2]


def _bf16_gpu() -> bool:
    import torch

    return torch.cuda.is_bf16_supported()


def node_processes(world_size: int) -> int:
    """Processes of this job on this node (all share its RAM)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size))


def available_memory(cfg, world_size: int) -> tuple[float, str]:
    """(bytes one process may use, where they come from) for the run's device."""
    device = _device(cfg, world_size)
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device)
        return float(free), f"free on {torch.cuda.get_device_name(device)}, {device}"
    ram, where = host_ram()
    n = node_processes(world_size)
    return ram / n, f"{where}, {n} process{'es' if n > 1 else ''} on this node"


def host_ram() -> tuple[float, str]:
    """(bytes, description) of the RAM this job may still take: MemAvailable, or the cgroup's room."""
    info = {}
    for line in Path(MEMINFO).read_text().splitlines():
        key, value = line.split(":", 1)
        info[key] = int(value.split()[0]) * 1024
    ram = float(info.get("MemAvailable", info["MemTotal"]))
    room = cgroup_room()
    if room is not None and room < ram:
        return room, "RAM under the cgroup memory limit"
    return ram, "RAM"


def cgroup_room() -> float | None:
    """Bytes the memory cgroup may still grow by (limit - working set), None without a limit."""
    for limit_f, usage_f, stat_f, key in CGROUP_FILES:
        try:
            raw = Path(limit_f).read_text().strip()
        except OSError:
            continue
        if raw == "max" or int(raw) >= 2**60:
            return None
        try:
            usage = int(Path(usage_f).read_text())
            stat = dict(line.split()[:2] for line in Path(stat_f).read_text().splitlines())
            usage -= int(stat.get(key, 0))  # page cache the kernel reclaims before it kills
        except (OSError, ValueError):
            usage = 0
        return float(max(0, int(raw) - usage))
    return None
