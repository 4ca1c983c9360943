"""Per-GPU memory of a training layout: exact parameter counts per rank, state by ZeRO stage / FSDP,
activations with recomputation and pipeline in-flight micro-batches. The one memory model: the planner
searches with it, and the trainer's fit check (`megaqwen.train.fit_check`, also the stage memory check
of `megaqwen-stages`) refuses runs with it.

Parameters are counted tensor by tensor from the model spec's shapes on one tp rank
(`ModelSpec.param_shapes`: the spec's own build and TP plan applied on meta, so whatever the
architecture declares is counted and sharded as the run shards it); experts split over ep and their
intermediate dim over etp (`Layout.etp`, `layer_shapes`); a pipeline
rank keeps its stages' layers, the first stage the embedding, the last the final norm and head (a tied
embedding on both); FSDP2 then splits each tensor's dim 0 over dp x cp in `torch.chunk` pieces
(expert tensors over the dp x cp x tp/etp / ep expert-data-parallel ranks). This is exact: it equals
`local_param_bytes` of the meta-device build (tests/plan/test_planner.py).

Bytes per parameter (fp32 master weights, AdamW), native engine: weights 4 + grads 4 + moments 8;
zero1 divides the moments by dp x cp (the experts' by edp: `ExpertZero1`), fsdp everything, except
that FSDP2 accumulates unsharded fp32 gradients over the micro-batches before the last (the trainer's
`grad_sync`). DeepSpeed (ZeRO paper accounting): compute-dtype weights and grads (2 + 2 in bf16,
4 + 4 in fp32) + fp32 master and moments 12; stage 1 shards the 12, stage 2 also the grads, stage 3
everything.

What does not shrink with dp: FSDP2 / ZeRO-3 gather the root unit (embedding, final norm, head: not
wrapped on their own, so one unit, kept whole through the step) and two layers, and reduce-scatter
from a copy of the largest unit's gradient; DDP (ddp, zero1) keeps its gradient buckets, a second
copy of every gradient. On the 168M config of benchmarks/memory_calibration.py these are why dp=2
peaks at 0.91x (FSDP2) and 1.01x (ZeRO-3) of one process rather than ~0.6x: the root is 78M of its
168M parameters.

Activations per micro-batch and layer: `layer_activation_elements` below, our derivation of Korthikanti
et al. 2022 for SwiGLU + GQA + flash attention (their GPT figure is sbh(34 + 5as/h) bytes in fp16
without flash attention, 34 sbh with it or with selective recomputation, 2 sbh with full
recomputation; ours per token and layer, in elements: norms 6h
(/tp under SP) + attention 5q + Hq + MLP 4I, all / tp; selective keeps 2q + 2kv, full h). Tokens per
rank = micro_batch x seq / cp. In flight on pipeline rank i (p ranks, m micro-batches, v chunks):
GPipe m; 1F1B min(m, p - i); interleaved and ZB-H1 min(m, p - i) x (1 + (p-1)/(p v)) (Narayanan et
al. 2021, the extra warm-up chunks); ZB-V p; DualPipeV p + 1 (DeepSeek-V3 table 2) micro-batches of a
rank's layers. The working margin: BACKWARD_TEMP_LAYERS (1.5) layers' full activations (backward's
temporaries), on the last stage the fp32 logits up to LOGITS_CHUNKS (2) chunks and the fp32 head
grad. The 1.5 layers were
fitted to five fp32 CPU runs with a 1,024-row vocabulary (the total within 10% of each measured
peak); the 2 chunks come from the debug model's real 151,936-row vocabulary, where logits dominate
backward's temporaries (counting one chunk: 0.67-0.78 of the measured peak at 256-8,192 tokens; two:
0.88-1.09).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from megaqwen.kernels.cross_entropy import CHUNK_LOGITS_BYTES
from megaqwen.models.config import ModelConfig
from megaqwen.models.spec import ParamShape, get_spec

GIB = 2**30


def layer_activation_elements(m: ModelConfig, recompute: str, tp: int = 1,
                              sequence_parallel: bool = False) -> float:
    """Activation elements kept per token per layer on one rank (see the module docstring):
    norms 6h (input, normalised, scaled output of both norms), attention 5q + Hq (q, k and v repeated
    to Hq heads, output, o_proj input; fp32 log-sum-exp), MLP 4I (gate, silu(gate), up, down_proj
    input; I is the spec's `mlp_activation_width`); selective recomputation keeps q + 2kv + the o_proj
    input instead of the attention's 5q, full keeps the layer's input only. Sequence parallelism
    divides the norms by tp, tp the rest."""
    h, q, kv = m.hidden_size, m.num_heads * m.head_dim_, m.kv_dim
    mlp_i = get_spec(m).mlp_activation_width(m)
    norms = 6 * h / (tp if sequence_parallel else 1)
    if recompute == "full":
        return h / (tp if sequence_parallel else 1)
    attn = (q + 2 * kv + q) if recompute == "selective" else (5 * q + m.num_heads)
    return norms + (attn + 4 * mlp_i) / tp


BACKWARD_TEMP_LAYERS = 1.5
"""Backward's temporaries, in layers' worth of full (no-recompute) activations. Fitted to five fp32
CPU runs (peak RSS above a warmed-up baseline, tests/plan/test_planner.py): residuals 0.7-2.6 layers.
A cold process also faults in ~100 MB of code pages on its first step: the trainer's fit check counts
those in its RUNTIME_BYTES (megaqwen/train/fit_check.py), not this margin."""
LOGITS_CHUNKS = 2
"""Chunked cross-entropy's working set, in chunks of fp32 logits (CHUNK_LOGITS_BYTES each): its loop
computes the next chunk's logits before rebinding `logits` frees the previous one (kernels/cross_entropy
`_chunked_pass`), so past one chunk two are alive (measured, debug model's 151,936-row vocabulary)."""

GATHERED_ROOT_COPIES = 2.2
"""Copies of the gathered root unit (embedding, final norm, head) at the peak of a sharded (FSDP2,
ZeRO-3) rank: the unsharded parameters plus the all-gather's output buffer, and the rest of what
the four sharded CPU runs of benchmarks/memory_calibration.py measured beyond the other terms.
FITTED on those four (with the one-process run, five; the ZeRO-1 run held out): 0.25-0.53 GiB above
one copy of a 0.29 GiB root, not growing with dp in step with anything else modelled."""


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: float
    """Device memory (what `torch.cuda.get_device_properties().total_memory` reports)."""
    peak_flops: float
    """Dense bf16 tensor-core FLOP/s (datasheet, as `megaqwen.parallel.metrics.PEAK_BF16_FLOPS`)."""
    intra_bw: float
    """Achievable all-reduce bus bandwidth inside a node, bytes/s (NVLink; nccl-tests busbw)."""
    inter_bw: float
    """Achievable bus bandwidth per GPU between nodes, bytes/s (one 400 Gb/s NIC per GPU)."""
    per_node: int = 8
    hbm_bw: float = 3.35e12
    """Device memory bandwidth, bytes/s (datasheet)."""


GPUS: dict[str, GPU] = {
    "h100": GPU("H100 SXM 80GB", 79.6 * GIB, 989e12, 360e9, 45e9, hbm_bw=3.35e12),
    "h200": GPU("H200 SXM 141GB", 139.8 * GIB, 989e12, 360e9, 45e9, hbm_bw=4.8e12),
    "a100": GPU("A100 SXM 80GB", 79.2 * GIB, 312e12, 230e9, 22e9, hbm_bw=2.04e12),  # 200 Gb/s HDR per GPU
    "a100-40g": GPU("A100 SXM 40GB", 39.4 * GIB, 312e12, 230e9, 22e9, hbm_bw=1.56e12),
}

DEEPSPEED_MODES = ("zero2", "zero3")
"""Layout dp_modes that mean the DeepSpeed engine (bf16 ZeRO stages 2 and 3)."""


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    dp: int = 1
    etp: int = -1
    """MoE expert tensor parallelism (parallel.etp): -1 = tp (each expert's intermediate dim over
    the tp group), k | tp (over k tp ranks, the tp group's rows cut into tp/k parts dispatched
    apart: ep may span tp ranks), 0 = experts whole on every tp rank (tp-fold repeated expert work)."""
    sequence_parallel: bool = True
    """Only matters with tp > 1 (the planner assumes it on, as every large run does)."""
    pp_schedule: str = "1f1b"
    pp_virtual_stages: int = 0
    """0 = the schedule's default (1 for gpipe/1f1b, 2 for the interleaved and V schedules)."""
    dp_mode: str = "fsdp"
    """ddp | zero1 | fsdp (native engine) or zero1 | zero2 | zero3 (DeepSpeed engine, bf16)."""
    recompute: str = "none"
    micro_batch: int = 1
    fsdp_reshard_after_forward: bool = True
    """fsdp only: parallel.fsdp_reshard_after_forward (free layers after forward, re-gather in backward)."""
    fsdp_keep_gathered: bool = False
    """fsdp only: parallel.fsdp_keep_gathered (every unit stays gathered through the step's micro-batches)."""

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def expert_tp(self) -> int:
        """Ranks each expert's intermediate dim is split over (1: whole)."""
        return self.tp if self.etp == -1 else max(self.etp, 1)

    @property
    def expert_parts(self) -> int:
        """Parts a tp group's rows are cut into before expert dispatch (tp / etp for 0 < etp < tp)."""
        return self.tp // self.etp if 0 < self.etp < self.tp else 1

    @property
    def edp(self) -> int:
        """Expert-data-parallel degree: ranks holding the same expert pieces (dp cp tp/etp / ep)."""
        return self.dp * self.cp * self.expert_parts // self.ep

    @property
    def virtual(self) -> int:
        from megaqwen.parallel.pipeline import SCHEDULES

        if self.pp_virtual_stages:
            return self.pp_virtual_stages
        return SCHEDULES[self.pp_schedule].default_virtual if self.pp_schedule in SCHEDULES else 1

    @property
    def engine(self) -> str:
        """The trainer's `train.engine` for this dp_mode: zero2 / zero3 are DeepSpeed's stages."""
        return "deepspeed" if self.dp_mode in DEEPSPEED_MODES else "native"

    def parallel_config(self):
        """The trainer's `ParallelConfig` for this layout (DeepSpeed modes: dp_mode=ddp, zero_stage)."""
        from megaqwen.parallel.config import ParallelConfig

        ds = self.engine == "deepspeed"
        return ParallelConfig(tp=self.tp, pp=self.pp, cp=self.cp, ep=self.ep, dp=self.dp, etp=self.etp,
                              dp_mode="ddp" if ds else self.dp_mode,
                              zero_stage=int(self.dp_mode[-1]) if ds else 1,
                              recompute=self.recompute, pp_schedule=self.pp_schedule,
                              fsdp_reshard_after_forward=self.fsdp_reshard_after_forward,
                              fsdp_keep_gathered=self.fsdp_keep_gathered,
                              pp_virtual_stages=self.pp_virtual_stages,
                              sequence_parallel=self.sequence_parallel)

    def validate(self, m: ModelConfig, seq: int, microbatches: int) -> None:
        """Refuse (ValueError) what the trainer refuses: its own validation,
        `parallel.setup.validate_layout`, on this layout's `ParallelConfig`; only the degrees' being
        positive is checked here (the trainer reads them from a config that cannot be < 1)."""
        bad = [f"{f}={getattr(self, f)} must be >= 1"
               for f in ("tp", "pp", "cp", "ep", "dp", "micro_batch") if getattr(self, f) < 1]
        if self.etp < -1:
            bad.append(f"etp={self.etp} must be -1 (= tp), 0 or a divisor of tp")
        if not bad:
            from megaqwen.parallel.dims import ParallelDims
            from megaqwen.parallel.setup import validate_layout

            pcfg = self.parallel_config()
            try:
                validate_layout(pcfg, ParallelDims.from_config(pcfg, self.world), m, seq, self.engine,
                                microbatches)
            except ValueError as e:
                if "needs the deepspeed package" not in str(e):  # where the plan is made, not run
                    bad.append(str(e))
        if bad:
            raise ValueError(f"layout {self}: " + "; ".join(bad))


@dataclass(frozen=True)
class RoutedExperts:
    """A mixture-of-experts model's routed experts, read from the model spec's parameter shapes (the
    tensors flagged `expert`) so the planner names no model field."""

    experts: int
    """Routed experts per sparse layer."""
    active: int
    """Experts each token runs through (top-k): the config's active count fixes it, since its
    inactive parameters are the (experts - active) unused experts of every sparse layer."""
    sparse_layers: int
    """Decoder layers with routed experts."""
    expert_shapes: tuple[tuple[int, ...], ...]
    """One expert's weight shapes (each (out, in))."""


def routed_experts(m: ModelConfig) -> RoutedExperts | None:
    """The routed experts of `m` (None for a dense model)."""
    shapes = get_spec(m).param_shapes(m, 1)
    if id(shapes) not in _ROUTED:  # the shapes are cached per config: so is this
        _ROUTED[id(shapes)] = (shapes, _routed_experts(m, shapes))
    return _ROUTED[id(shapes)][1]


_ROUTED: dict[int, tuple[object, RoutedExperts | None]] = {}


def _routed_experts(m: ModelConfig, shapes) -> RoutedExperts | None:
    kinds = {id(layer): any(t.expert for t in layer) for layer in shapes.layers}  # layers share kinds
    sparse = [layer for layer in shapes.layers if kinds[id(layer)]]
    if not sparse:
        return None
    one: dict[str, list[tuple[int, ...]]] = {}  # expert module (name minus "module.param") -> shapes
    for t in sparse[0]:
        if t.expert:
            one.setdefault(t.name.rsplit(".", 2)[0], []).append(t.shape)
    per_expert = sum(math.prod(x) for x in next(iter(one.values())))
    unused = (m.num_params() - m.active_params()) // (per_expert * len(sparse))
    return RoutedExperts(len(one), len(one) - unused, len(sparse), tuple(next(iter(one.values()))))


def layer_shapes(m: ModelConfig, lay: Layout) -> tuple[tuple[ParamShape, ...], ...]:
    """Every decoder layer's tensors on one tp rank (layers of one kind share one tuple), routed
    experts sliced as `lay.etp` slices them: the spec's tp-rank shapes split the experts over the
    whole tp group (etp = tp, the default); for etp = k the dims that tp splits are split by k
    instead, for etp = 0 the experts stay whole (their tp=1 shapes)."""
    shapes = get_spec(m).param_shapes(m, lay.tp)
    if lay.expert_tp == lay.tp or not routed_experts(m):
        return shapes.layers
    whole = get_spec(m).param_shapes(m, 1).layers
    key = (id(shapes), lay.expert_tp)
    if key not in _ETP_SHAPES:
        out: dict[int, tuple[ParamShape, ...]] = {}
        for at_tp, full in zip(shapes.layers, whole):
            if id(at_tp) not in out:
                out[id(at_tp)] = tuple(
                    replace(t, shape=tuple(f // lay.expert_tp if f != x else f
                                           for f, x in zip(w.shape, t.shape)))
                    if t.expert else t for t, w in zip(at_tp, full))
        _ETP_SHAPES[key] = (shapes, tuple(out[id(x)] for x in shapes.layers))
    return _ETP_SHAPES[key][1]


_ETP_SHAPES: dict[tuple[int, int], tuple[object, tuple]] = {}


def _chunk(n0: int, parts: int, rank: int) -> int:
    """Rows of dim 0 that `torch.chunk(t, parts)[rank]` holds (FSDP2's Shard(0))."""
    c = math.ceil(n0 / parts)
    return max(0, min(c, n0 - rank * c))


def stage_layers(m: ModelConfig, lay: Layout, pp_rank: int) -> tuple[list[int], bool, bool]:
    """(decoder layers, holds the first stage, holds the last stage) of pipeline rank `pp_rank`, as
    the trainer's pipeline plan places them (`parallel.pipeline.plan_pipeline`: even split, V-shaped
    schedules putting stage s and 2p-1-s on one rank)."""
    from megaqwen.parallel.pipeline import plan_pipeline

    if lay.pp == 1:
        return list(range(m.num_layers)), True, True
    stages = lay.pp * lay.virtual  # enough micro-batches for every schedule: placement only
    plan = plan_pipeline(m.num_layers, lay.pp, lay.pp_schedule, lay.virtual, None, stages)
    mine = plan.stages_of(pp_rank)
    return [i for s in mine for i in plan.layer_ids(s)], 0 in mine, plan.num_stages - 1 in mine


def rank_param_count(m: ModelConfig, lay: Layout, pp_rank: int = 0, dp_rank: int = 0,
                     fsdp: bool | None = None, experts_only: bool = False) -> int:
    """Parameter elements held by one rank (its tp piece, pp stages, ep experts, FSDP chunk), from the
    model spec's shapes on a tp rank (`ModelSpec.param_shapes`). dp_rank indexes the dp x cp group
    (FSDP's mesh); expert tensors are chunked over the expert-data-parallel group (dp x cp / ep ranks,
    position dp_rank // ep). Every ep rank holds E / ep of each sparse layer's equal-shaped experts, so
    the count does not depend on the ep rank. `experts_only`: the routed experts' elements alone."""
    fsdp = lay.dp_mode == "fsdp" if fsdp is None else fsdp
    shapes = get_spec(m).param_shapes(m, lay.tp)
    per_layer = layer_shapes(m, lay)
    layers, first, last = stage_layers(m, lay, pp_rank)
    dpc = lay.dp * lay.cp

    def size(shape: tuple[int, ...], parts: int, r: int) -> int:
        return (_chunk(shape[0], parts, r) if fsdp else shape[0]) * math.prod(shape[1:])

    def count(tensors: tuple[ParamShape, ...]) -> int:
        dense = 0 if experts_only else sum(size(t.shape, dpc, dp_rank) for t in tensors if not t.expert)
        experts = sum(size(t.shape, lay.edp, dp_rank // lay.ep) for t in tensors if t.expert)
        return dense + experts // lay.ep

    kinds: dict[int, list] = {}  # layers of one kind share one shapes tuple: count each kind once
    for i in layers:
        kinds.setdefault(id(per_layer[i]), [per_layer[i], 0])[1] += 1
    n = sum(k * count(tensors) for tensors, k in kinds.values())
    if experts_only:
        return n
    if first or (last and m.tie_word_embeddings):
        n += count(shapes.first)
    return n + (count(shapes.last) if last else 0)


@dataclass
class MemoryEstimate:
    """Bytes on the most loaded rank of one pipeline position."""

    pp_rank: int
    params: int
    """Parameter elements on this rank (unsharded by dp for ddp/zero1/DeepSpeed 1-2)."""
    weights: float
    grads: float
    optimizer: float
    activations: float
    in_flight: float
    """Micro-batches of this rank's layers kept at the peak."""
    margin: float
    """Transients: backward's temporaries, the logits, the head gradient, the reduce-scatter input."""
    device_bytes: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)
    gathered: float = 0.0
    """FSDP / ZeRO-3 working copies: the largest unit whole (the root: embedding, norm, head, kept
    gathered through the step) and two layers (the current one and the prefetched next)."""
    buffers: float = 0.0
    """Communication buffers that do not shrink with dp: DDP's gradient buckets (a second copy of
    every gradient DDP reduces, so not of ep > 1 experts; `gradient_as_bucket_view` is off) for ddp
    and zero1."""

    @property
    def state(self) -> float:
        return self.weights + self.grads + self.optimizer

    @property
    def total(self) -> float:
        return self.state + self.gathered + self.activations + self.margin + self.buffers

    @property
    def fits(self) -> bool:
        """Under 90% of the device (allocator fragmentation, CUDA context, NCCL buffers)."""
        return self.total <= 0.9 * self.device_bytes


def in_flight(lay: Layout, pp_rank: int, microbatches: int) -> float:
    p, m, v, s = lay.pp, microbatches, lay.virtual, lay.pp_schedule
    if p == 1:
        return 1.0
    if s == "gpipe":
        return float(m)
    if s == "1f1b":
        return float(min(m, p - pp_rank))
    if s in ("interleaved_1f1b", "zero_bubble"):
        return min(m, p - pp_rank) * (1 + (p - 1) / (p * v))
    return float(min(m, p + (s == "dualpipev")))


def estimate_memory(m: ModelConfig, lay: Layout, seq: int, microbatches: int, *, act_bytes: int = 2,
                    device_bytes: float = 0.0, pp_rank: int | None = None) -> MemoryEstimate:
    """Memory of the worst pipeline rank (or of `pp_rank`), dp/ep rank 0 (FSDP's largest chunk); a
    layout the trainer refuses raises its ValueError."""
    if pp_rank is None:
        lay.validate(m, seq, microbatches)
        ests = [estimate_memory(m, lay, seq, microbatches, act_bytes=act_bytes, device_bytes=device_bytes,
                                pp_rank=r) for r in range(lay.pp)]
        return max(ests, key=lambda e: e.total)
    dpc = lay.dp * lay.cp
    mode = lay.dp_mode
    n = rank_param_count(m, lay, pp_rank, fsdp=mode == "fsdp")
    full = rank_param_count(m, lay, pp_rank, fsdp=False)
    sharded = mode in ("fsdp", "zero3") and dpc > 1
    grad_bytes = 4 if mode in ("ddp", "zero1", "fsdp") else act_bytes  # FSDP reduces in fp32
    if mode in ("ddp", "zero1", "fsdp"):
        weights, grads = 4.0 * n, 4.0 * n
        optimizer = 8.0 * (n if mode == "fsdp" else full if mode == "ddp" else full / dpc)
        if mode == "zero1" and lay.ep > 1:  # experts' moments over their edp group (ExpertZero1)
            experts = rank_param_count(m, lay, pp_rank, fsdp=False, experts_only=True)
            optimizer = 8.0 * ((full - experts) / dpc + experts / lay.edp)
        if sharded and microbatches > 1:  # no reduce-scatter before the last micro-batch (grad_sync):
            grads += 4.0 * full  # FSDP2 accumulates unsharded gradients until then
    else:  # DeepSpeed: compute-dtype weights and grads, fp32 master + moments (12), sharded by stage
        stage = int(mode[-1])
        weights = act_bytes * full / (dpc if stage == 3 else 1)
        grads = act_bytes * full / (dpc if stage >= 2 else 1)
        optimizer = 12.0 * full / dpc
    tokens = lay.micro_batch * seq / lay.cp
    layers, first, last = stage_layers(m, lay, pp_rank)
    sp_on = lay.sequence_parallel
    per_layer = layer_activation_elements(m, lay.recompute, lay.tp, sp_on) * act_bytes * tokens
    full_layer = layer_activation_elements(m, "none", lay.tp, lay.sequence_parallel) * act_bytes * tokens
    k = in_flight(lay, pp_rank, microbatches)
    acts = k * len(layers) * per_layer
    sp = lay.tp if lay.sequence_parallel else 1
    if first:
        acts += k * m.hidden_size / sp * tokens * act_bytes  # embedding output
    if last:
        acts += k * 3 * m.hidden_size / sp * tokens * act_bytes  # final norm (input, normalised, out)
    acts += 2 * m.head_dim_ * tokens * 4  # RoPE cos/sin (fp32), shared by every layer
    margin = BACKWARD_TEMP_LAYERS * full_layer if layers else 0.0
    if last:
        logits = min(tokens * m.vocab_size / lay.tp * 4, LOGITS_CHUNKS * CHUNK_LOGITS_BYTES)
        margin += logits + 4 * m.vocab_size * m.hidden_size / lay.tp
    gathered = buffers = 0.0
    if sharded:
        root, layer = unit_params(m, lay, pp_rank)
        if lay.fsdp_keep_gathered or not lay.fsdp_reshard_after_forward:  # every layer stays gathered
            gathered = act_bytes * (GATHERED_ROOT_COPIES * root + (full - root))
        else:
            gathered = act_bytes * (GATHERED_ROOT_COPIES * root + 2 * layer)
        margin += grad_bytes * max(root, layer)  # the reduce-scatter's input copy of the largest unit
    elif mode in ("ddp", "zero1") and dpc > 1:
        buffers = 4.0 * full
        if lay.ep > 1:  # DDP leaves the experts out (`ddp_ignore_experts`): no buckets for them
            buffers -= 4.0 * rank_param_count(m, lay, pp_rank, fsdp=False, experts_only=True)
    return MemoryEstimate(pp_rank, n, weights, grads, optimizer, acts, k, margin, device_bytes,
                          gathered=gathered, buffers=buffers)


def unit_params(m: ModelConfig, lay: Layout, pp_rank: int) -> tuple[int, int]:
    """(root unit, largest layer) parameter elements on one rank, unsharded over dp: the FSDP units
    `parallel.data_parallel.apply_fsdp` makes (one per layer, the root holding the rest); a layer's
    routed experts count E / ep."""
    shapes = get_spec(m).param_shapes(m, lay.tp)
    per_layer = layer_shapes(m, lay)
    layers, first, last = stage_layers(m, lay, pp_rank)

    def count(tensors) -> int:
        return sum(math.prod(t.shape) // (lay.ep if t.expert else 1) for t in tensors)

    root = (count(shapes.first) if first or (last and m.tie_word_embeddings) else 0) + \
        (count(shapes.last) if last else 0)
    return root, max((count(per_layer[i]) for i in layers), default=0)


def with_(lay: Layout, **kw) -> Layout:
    return replace(lay, **kw)
