"""Will a stage fit? Per-rank memory estimate (model state + activations) against the device's memory,
with advice when it does not fit.

Activations are counted the way Korthikanti et al. 2022 count them (bytes kept between forward and
backward), for our layer with O(T) attention (flash / SDPA's flash path: no T x T scores are kept),
in elements per token per layer with h hidden, q = Hq D, kv = Hk D, I intermediate:
  norms      2 x 3h   (input, normalised, scaled output)
  attention  5q + Hq  (q, k and v repeated to Hq heads, output, o_proj input; fp32 log-sum-exp)
  MLP        4I       (gate, silu(gate), up, down_proj input)
Measured on CPU with saved-tensor hooks (debug model, fp32): 5,490 bytes per token per layer; this
formula gives 5,648 (+2.9%). `selective` recomputation keeps q + 2kv + o_proj input instead of the
attention's 5q; `full` keeps each layer's input (h) only, plus one layer's full set while it is
re-run. Sequence parallelism divides the norms by tp, tp divides the rest; cp divides the tokens.
The per-layer formula is `megaqwen.plan.memory.layer_activation_elements`, shared with the planner,
whose per-rank estimate the run's start-up fit check uses (`megaqwen.train.fit_check`).
Model state: weights and gradients (4 bytes each, fp32 master), Adam moments (8 bytes), divided by
tp x pp, and by dp for what ZeRO-1 / FSDP shard. A working margin of one layer's activations plus
one chunk of logits covers backward's temporaries.

Against measured CPU peaks (VmHWM of 2 AdamW steps in a fresh process, debug model) the total is
within 25% for 3-8 layers at 4K-16K tokens (none, selective, full; tests/train/test_memory_check.py)
but errs high for shallow models at long T, where backward's temporaries are fewer layers' worth:
766 MiB estimated vs 503 measured (2 layers, 16K). So "does not fit" may be pessimistic there; "fits"
has not been seen to be wrong. GPU peaks under the caching allocator are not measured here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from megaqwen.kernels.cross_entropy import CHUNK_LOGITS_BYTES
from megaqwen.models.config import ModelConfig
from megaqwen.plan.memory import layer_activation_elements

GIB = 2**30
TEMPORARY_LAYERS = 5  # backward's working set, in layers' worth of activations (measured, see estimate)


@dataclass
class MemoryReport:
    """Per-rank estimate in bytes, and whether it fits `device_bytes`."""

    state: float
    activations: float
    margin: float
    device_bytes: float
    device: str
    advice: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.state + self.activations + self.margin

    @property
    def fits(self) -> bool:
        return self.total <= 0.9 * self.device_bytes  # 10% for the allocator, CUDA context, buffers

    def summary(self) -> str:
        s = (f"memory per rank: {self.total / GIB:.2f} GiB estimated (model state "
             f"{self.state / GIB:.2f}, activations {self.activations / GIB:.2f}, working margin "
             f"{self.margin / GIB:.2f}) of {self.device_bytes / GIB:.1f} GiB on {self.device}: "
             + ("fits" if self.fits else "DOES NOT FIT"))
        return s + ("; " + "; ".join(self.advice) if self.advice else "")


def estimate(m: ModelConfig, seq_len: int, micro_batch: int, *, tp: int = 1, cp: int = 1, pp: int = 1,
             dp: int = 1, dp_mode: str = "ddp", sequence_parallel: bool = False,
             recompute: str = "none", act_bytes: int = 4, device_bytes: float = 0.0,
             device: str = "cpu") -> MemoryReport:
    """Per-rank memory of one training step; advice lists the cheapest changes that make it fit."""
    tokens = micro_batch * seq_len / cp
    layers = math.ceil(m.num_layers / pp)
    per_layer = layer_activation_elements(m, recompute, tp, sequence_parallel) * act_bytes * tokens
    full_layer = layer_activation_elements(m, "none", tp, sequence_parallel) * act_bytes * tokens
    acts = layers * per_layer + 4 * m.hidden_size * tokens * act_bytes  # + embedding out, final norm
    acts += 2 * m.head_dim_ * tokens * 4  # RoPE cos/sin (fp32), shared by every layer
    params = m.num_params() / (tp * pp)
    weights_grads = 8 * params / (dp if dp_mode == "fsdp" else 1)
    adam = 8 * params / (dp if dp_mode in ("zero1", "fsdp") else 1)
    # backward's temporaries: measured on CPU at 5-6x one layer's activations (gradients of the
    # layer's tensors, SDPA backward buffers, the re-run layer under full recompute), plus one chunk
    # of fp32 logits and its softmax (chunked cross-entropy's budget) and its fp32 head-gradient sum
    logits = min(tokens * m.vocab_size / tp * 4, CHUNK_LOGITS_BYTES)
    margin = TEMPORARY_LAYERS * full_layer + 2 * logits + 4 * m.vocab_size * m.hidden_size / tp
    report = MemoryReport(weights_grads + adam, acts, margin, device_bytes, device)
    if not report.fits:
        report.advice = _advice(m, seq_len, micro_batch, tp=tp, cp=cp, pp=pp, dp=dp, dp_mode=dp_mode,
                                sequence_parallel=sequence_parallel, recompute=recompute,
                                act_bytes=act_bytes, device_bytes=device_bytes, device=device)
    return report


def _advice(m, seq_len, micro_batch, **kw) -> list[str]:
    """Single changes, cheapest first, that bring the estimate under the device's memory."""
    tries = []
    if kw["recompute"] == "none":
        tries.append(("parallel.recompute=selective", dict(recompute="selective")))
    if kw["recompute"] != "full":
        tries.append(("parallel.recompute=full", dict(recompute="full")))
    for cp in (2, 4, 8, 16, 32):
        if cp > kw["cp"]:
            tries.append((f"parallel.cp={cp}", dict(cp=cp)))
            tries.append((f"parallel.cp={cp} with parallel.recompute=full", dict(cp=cp, recompute="full")))
    if micro_batch > 1:
        tries.append(("train.micro_batch_size=1", dict(micro_batch=1)))
    if kw["dp"] > 1 and kw["dp_mode"] != "fsdp":
        tries.append(("parallel.dp_mode=fsdp", dict(dp_mode="fsdp")))
    out = []
    for text, change in tries:
        args = {**kw, **change}
        mb = args.pop("micro_batch", micro_batch)
        if estimate(m, seq_len, mb, **args).fits:
            out.append(f"fits with {text}")
            if len(out) == 3:
                break
    return out or ["no single change fits: raise cp and tp together, or use more devices"]


def check_stage_memory(cfg, world_size: int = 1) -> MemoryReport:
    """The estimate for a training Config (megaqwen.train.config.Config) against the memory one of
    its processes may use here (`fit_check.available_memory`: free GPU memory, or this process's share
    of the RAM within any cgroup limit)."""
    from megaqwen.parallel.dims import ParallelDims
    from megaqwen.train.fit_check import available_memory, run_shape

    p, t = cfg.parallel, cfg.train
    dims = ParallelDims.from_config(p, world_size)
    total, where = available_memory(cfg, world_size)
    return estimate(cfg.model, t.seq_len, t.micro_batch_size, tp=dims.tp, cp=dims.cp, pp=dims.pp,
                    dp=dims.dp, dp_mode=p.dp_mode, sequence_parallel=p.sequence_parallel,
                    recompute=p.recompute, act_bytes=run_shape(cfg, world_size).act_bytes,
                    device_bytes=total, device=where)
