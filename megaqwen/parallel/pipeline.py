"""Pipeline parallelism on `torch.distributed.pipelining`: stages cut from the meta-device model.

    plan = plan_pipeline(cfg.num_layers, pcfg, microbatches)   # arithmetic only: errors before work
    prune_to_rank(model, plan, pp_rank, spec.pipeline)         # on meta: keep this rank's part
    ... TP/SP -> recompute -> compile on what is left ...
    views = stage_modules(model, plan, pp_rank, act_shape)     # one module per local model chunk
    ... FSDP2 per layer and per chunk, materialise / load ...
    pipe = Pipeline(plan, views, mesh, device)                 # PipelineStages + the schedule
    pipe.step(micro_batches, meter)                            # one optimizer step's fwd + bwd
    pipe.reduce_grads(dp_mode)                                 # dp all-reduce, tied embedding sum

Stages: `pp * v` chunks of consecutive layers, `v` per rank (virtual stages). Looped schedules put
stage s on rank s % pp; the V-shaped ones (zbv, dualpipev) put stage s < pp on rank s and stage
s >= pp on rank 2pp-1-s, so rank 0 holds both the first and the last chunk.

Parameter names never change: each rank's model keeps the full module tree minus what it does not
own (layers of other stages, the embedding off the first stage, norm and head off the last), so a
DCP checkpoint saved under one pp loads under any other, including pp=1.

Stages run the model's own code: the spec's pipeline split (`ModelSpec.pipeline`) prunes each
rank's meta model and names the modules a chunk runs besides its layers; a chunk calls the model's
`hidden_states` over its layers, its `aux_terms` share, and on the last chunk the step's objective
(`megaqwen.train.objective`). Nothing here names a model's modules.

Shared parameters (tied embeddings, 0.5B-3B): the last stage keeps its own copy of what the split
calls `shared_params`. The first and last stage ranks that share dp/cp/tp coordinates form an
*embedding group* (Megatron's); after every step their gradients are summed there, so both copies
receive the full gradient and stay bit-identical through identical optimizer updates. When one rank
holds both ends (V-shaped schedules) the chunks share the one Parameter and autograd sums the two
uses itself.

Objective: the last chunk computes the objective inside its forward (head weight and labels at
hand, as Megatron's last stage does) and returns what `StepMeter.add` gives: `sum * scale` plus the
aux terms, the same objective the single-process trainer backpropagates (scale = dp / global units
of the step), so `scale_grads=False` and the gradients equal one process over any number of
micro-batches. Earlier chunks attach their aux-term share to their output activations.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn

from megaqwen.kernels.attention import AttentionMeta

log = logging.getLogger(__name__)


class EvalParts(NamedTuple):
    """`Pipeline.eval_parts`: one micro-batch's objective sum, units and metric sums (as an
    objective's `ObjectiveParts`), whole on every pp rank."""

    sum: torch.Tensor
    count: torch.Tensor
    metrics: dict[str, torch.Tensor]


@dataclass(frozen=True)
class _Schedule:
    cls: str
    """Class name in torch.distributed.pipelining."""
    multi: bool
    """Several stages per rank allowed (PipelineScheduleMulti)."""
    v_shape: bool
    """Stages placed V-wise (exactly 2 per rank)."""
    default_virtual: int


SCHEDULES = {
    "gpipe": _Schedule("ScheduleGPipe", False, False, 1),
    "1f1b": _Schedule("Schedule1F1B", False, False, 1),
    "interleaved_1f1b": _Schedule("ScheduleInterleaved1F1B", True, False, 2),
    "zero_bubble": _Schedule("ScheduleInterleavedZeroBubble", True, False, 2),
    "zbv": _Schedule("ScheduleZBVZeroBubble", True, True, 2),
    "dualpipev": _Schedule("ScheduleDualPipeV", True, True, 2),
}


@dataclass(frozen=True)
class PipelinePlan:
    pp: int
    """Pipeline ranks."""
    virtual: int
    """Model chunks (stages) per rank."""
    schedule: str
    """Key of SCHEDULES."""
    layers: tuple[int, ...]
    """Decoder layers of each stage, in stage order."""
    microbatches: int
    """Micro-batches per optimizer step."""

    @property
    def num_stages(self) -> int:
        return self.pp * self.virtual

    @property
    def v_shape(self) -> bool:
        return SCHEDULES[self.schedule].v_shape

    def stage_rank(self, stage: int) -> int:
        """pp rank holding `stage`."""
        if self.v_shape:
            return stage if stage < self.pp else 2 * self.pp - 1 - stage
        return stage % self.pp

    def stages_of(self, pp_rank: int) -> list[int]:
        return [s for s in range(self.num_stages) if self.stage_rank(s) == pp_rank]

    def layer_ids(self, stage: int) -> range:
        start = sum(self.layers[:stage])
        return range(start, start + self.layers[stage])

    @property
    def first_rank(self) -> int:
        return self.stage_rank(0)

    @property
    def last_rank(self) -> int:
        return self.stage_rank(self.num_stages - 1)

    def bubble_fraction(self) -> float:
        """Theoretical idle fraction of a step with equal forward, input-grad and weight-grad times:
        `megaqwen.parallel.bubble.bubble_fraction` (the planner's model too): GPipe/1F1B
        (p-1)/(m+p-1), interleaving divides it by v, ZB-H1 by 3v, ZB-V 0, DualPipeV (p-1)/(3m+p-1)."""
        from megaqwen.parallel.bubble import bubble_fraction

        return bubble_fraction(self.schedule, self.pp, self.microbatches, self.virtual)


def _even_split_hint(num_layers: int, stages: int) -> list[int]:
    base, extra = divmod(num_layers, stages)
    # the remainder goes to the middle stages: the first and last also carry embedding and head
    split = [base] * stages
    for i in range(extra):
        split[1 + i % max(1, stages - 2)] += 1
    return split


def plan_pipeline(num_layers: int, pp: int, schedule: str, virtual: int, layers: list[int] | None,
                  microbatches: int) -> PipelinePlan:
    """Validate the pipeline settings against the model and the batch (pure arithmetic, so a bad
    layout fails at start-up with the numbers named) and place the stages."""
    if schedule not in SCHEDULES:
        raise ValueError(f"parallel.pp_schedule={schedule!r}; choose from {' | '.join(SCHEDULES)}")
    sched = SCHEDULES[schedule]
    v = virtual or sched.default_virtual
    if v < 1:
        raise ValueError(f"parallel.pp_virtual_stages must be >= 0 (0 = schedule default), got {virtual}")
    if not sched.multi and v != 1:
        raise ValueError(f"parallel.pp_schedule={schedule} runs one stage per rank; set "
                         f"parallel.pp_virtual_stages=1 (or 0), or use interleaved_1f1b for {v} chunks")
    if sched.v_shape and v != 2:
        raise ValueError(f"parallel.pp_schedule={schedule} places exactly 2 stages per rank (V shape); "
                         f"got parallel.pp_virtual_stages={v}")
    stages = pp * v
    if layers is not None:
        layers = [int(n) for n in layers]
        if len(layers) != stages:
            raise ValueError(f"parallel.pp_layers has {len(layers)} entries but pp*virtual stages = "
                             f"{pp}*{v} = {stages}")
        if sum(layers) != num_layers:
            raise ValueError(f"parallel.pp_layers={layers} sums to {sum(layers)}, but the model has "
                             f"num_layers={num_layers}")
        if any(n < 0 for n in layers) or any(n < 1 for n in layers[1:-1]):
            raise ValueError(f"parallel.pp_layers={layers}: every middle stage needs >= 1 layer "
                             "(only the first and last may hold 0: embedding or head alone)")
    else:
        if num_layers % stages:
            raise ValueError(f"num_layers={num_layers} is not divisible by pp*virtual stages = {pp}*{v} = "
                             f"{stages}; choose another pp/pp_virtual_stages or split explicitly, e.g. "
                             f"parallel.pp_layers={_even_split_hint(num_layers, stages)}")
        layers = [num_layers // stages] * stages
    m = microbatches
    need = {"gpipe": 1, "1f1b": pp, "dualpipev": stages, "zbv": stages}.get(schedule, 1)
    if m < need:
        raise ValueError(f"parallel.pp_schedule={schedule} with pp={pp} needs at least {need} micro-batches "
                         f"per step, got {m} (= global_batch_size / (micro_batch_size * dp)); raise "
                         "train.global_batch_size or lower train.micro_batch_size")
    if sched.multi and not sched.v_shape:
        rounds = max(1, m // pp)
        if m % rounds:
            raise ValueError(f"parallel.pp_schedule={schedule}: {m} micro-batches per step is not a multiple "
                             f"of the {rounds} rounds of {pp} it runs; use a multiple of pp={pp}")
    return PipelinePlan(pp=pp, virtual=v, schedule=schedule, layers=tuple(layers), microbatches=m)


def plan_from_config(pcfg: Any, num_layers: int, microbatches: int) -> PipelinePlan:
    return plan_pipeline(num_layers, pcfg.pp, pcfg.pp_schedule, pcfg.pp_virtual_stages,
                         list(pcfg.pp_layers) if pcfg.pp_layers is not None else None, microbatches)


def prune_to_rank(model: nn.Module, plan: PipelinePlan, pp_rank: int, split: Any) -> None:
    """Delete, on the meta model, everything this pp rank does not run (the spec's pipeline split
    `split` knows which modules those are; names of the rest unchanged)."""
    stages = plan.stages_of(pp_rank)
    keep = {i for s in stages for i in plan.layer_ids(s)}
    split.prune(model, keep, first=0 in stages, last=plan.num_stages - 1 in stages)


class StageModule(nn.Module):
    """One model chunk as a pipeline stage. Its forward is the model's own: `hidden_states` over the
    chunk's layers (embedding first when given token ids, final norm on the last chunk), the
    model's `aux_terms` share of these layers, and on the last chunk the step's objective. It
    registers the modules the chunk runs (its layers and the split's boundary modules) so the
    schedule and FSDP2 see them; their names here are never saved."""

    def __init__(self, model: nn.Module, stage: int, plan: PipelinePlan, act_dtype: torch.dtype,
                 cp_group: dist.ProcessGroup | None = None, cp_tile: int = 512, spec: Any = None):
        super().__init__()
        spec = spec or model.cfg.spec
        self.cp_group, self.cp_tile = cp_group, cp_tile
        """Context parallelism: every stage gets the full (B, T) inputs and runs its zig-zag shard."""
        self.stage_index = stage
        self.is_first, self.is_last = stage == 0, stage == plan.num_stages - 1
        self.layer_ids = list(plan.layer_ids(stage))
        layers = spec.layers(model)
        self.layers = nn.ModuleList(layers[str(i)] for i in self.layer_ids)
        self.boundary = nn.ModuleDict(spec.pipeline.boundary_modules(model, self.is_first, self.is_last))
        self.act_dtype = act_dtype
        self.meter = None
        """The step's `StepMeter` while `Pipeline.step` runs (None: forward only, for evaluation)."""
        self.objective = None
        """The step's objective (set with the meter)."""
        self.records: list = []
        """Forward-only: the objective's parts of each forward of the last chunk."""
        object.__setattr__(self, "_model", model)  # the rank's model: its methods run the chunk

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, document_ids: torch.Tensor | None = None,
                **fields: torch.Tensor) -> torch.Tensor:
        m = self._model
        if self.cp_group is not None:  # full (B, T) inputs on every cp rank: this rank's zig-zag shard
            from megaqwen.parallel.context_parallel import ContextParallelMeta, shard_sequence

            cp, r = dist.get_world_size(self.cp_group), dist.get_rank(self.cp_group)
            attn = ContextParallelMeta(document_ids, self.cp_group, shape=tuple(position_ids.shape),
                                       device=position_ids.device, tile=self.cp_tile)
            position_ids = shard_sequence(position_ids, cp, r)
            fields = {k: shard_sequence(v, cp, r) for k, v in fields.items()}
            if not x.is_floating_point():
                x = shard_sequence(x, cp, r)
        else:
            attn = AttentionMeta(document_ids) if document_ids is not None else None
        records: list = []
        h = m.hidden_states(x, position_ids, attn, layers=self.layer_ids, final_norm=self.is_last,
                            records=records)
        aux = m.aux_terms(records, partial=True)  # this chunk's share of the model's aux terms
        if not self.is_last:
            extra = self.meter.aux_objective(aux) if self.meter is not None else None
            if extra is not None and extra.requires_grad:
                h = _AttachLoss.apply(h, extra)
            return h.to(self.act_dtype)
        if self.objective is None:
            raise RuntimeError("a pipeline's last chunk runs only inside Pipeline.step / forward_only")
        parts = self.objective(m, h, {**fields, "cp_group": self.cp_group})
        if self.meter is None:  # forward only (`Pipeline.forward_only`): any result, kept here
            self.records.append(parts)
            return h.new_zeros(())
        return self.meter.add(parts, aux)


class _AttachLoss(torch.autograd.Function):
    """Identity on the activations whose backward also seeds `loss` with 1: a stage's own loss term
    (MoE z-loss) is back-propagated when the activations' gradient arrives from the next stage."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.loss_meta = (loss.dtype, loss.device)
        return h.clone()  # not a view: FSDP2 hooks the stage output, and a view would lose the hook

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dtype, device = ctx.loss_meta
        return grad, torch.ones((), dtype=dtype, device=device)


def stage_modules(model: nn.Module, plan: PipelinePlan, pp_rank: int,
                  act_dtype: torch.dtype = torch.float32, cp_group: dist.ProcessGroup | None = None,
                  cp_tile: int = 512) -> list[StageModule]:
    """This rank's chunks, in stage order (after TP/SP, EP, CP, recompute and compile: they
    reference the modules those plans left in place)."""
    return [StageModule(model, s, plan, act_dtype, cp_group, cp_tile) for s in plan.stages_of(pp_rank)]


def apply_fsdp_stages(views: list[StageModule], layers: nn.ModuleDict, dp_mesh, mp_param_dtype=None,
                      reshard_after_forward: bool = True) -> None:
    """FSDP2 under pipelining: every layer, then every chunk (owning its embedding / norm / head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=mp_param_dtype, reduce_dtype=torch.float32)
    seen: set[int] = set()
    shared = False
    for v in views:  # a module two chunks of this rank both run (a tied embedding, V schedules)
        ids = {id(m) for m in v.boundary.values()}
        shared |= bool(ids & seen)
        seen |= ids
    if shared:
        raise ValueError("dp_mode=fsdp cannot shard a tied embedding used by two chunks of one rank "
                         "(V-shaped schedules zbv/dualpipev with tie_word_embeddings); use dp_mode=ddp "
                         "or zero1, or a looped schedule (1f1b, interleaved_1f1b, zero_bubble)")
    for layer in layers.values():
        fully_shard(layer, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    for v in views:
        # chunk-level parameters (embedding, norm, head) stay gathered until backward: the head is
        # used by the loss right after the chunk's last layer
        fully_shard(v, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False)


def after_materialize(views: list[StageModule]) -> None:
    """FSDP2 re-points its sharded parameters only when `_apply` runs on the FSDP module itself;
    the chunks are not children of the model, so run it on them after `model.to_empty`."""
    from torch.distributed.fsdp import FSDPModule

    for v in views:
        if isinstance(v, FSDPModule):
            v._apply(lambda t: t)


def _timed_stage_class():
    from torch.distributed.pipelining import PipelineStage

    class TimedStage(PipelineStage):
        """A PipelineStage that adds up the seconds its compute actions take (for the measured bubble)."""

        busy_s = 0.0

        def _timed(self, fn, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.busy_s += time.perf_counter() - t0

        def forward_one_chunk(self, *args, **kwargs):
            return self._timed(super().forward_one_chunk, *args, **kwargs)

        def backward_one_chunk(self, *args, **kwargs):
            return self._timed(super().backward_one_chunk, *args, **kwargs)

        def backward_weight_one_chunk(self, *args, **kwargs):
            return self._timed(super().backward_weight_one_chunk, *args, **kwargs)

    return TimedStage


def _loss_passthrough(output: Any, target: Any) -> torch.Tensor:
    """The last chunk already returns the scaled loss."""
    return output[0] if isinstance(output, (tuple, list)) else output


def embedding_group(mesh, plan: PipelinePlan, tied: bool) -> dist.ProcessGroup | None:
    """Collective (every rank, same order): this rank's group of {first stage rank, last stage rank}
    at its dp/cp/tp coordinates; None when embeddings are untied or one rank holds both ends."""
    if not tied or plan.first_rank == plan.last_rank:
        return None
    grid = mesh.mesh.mesh  # (pp, dp, cp, tp) global ranks
    me, mine = dist.get_rank(), None
    for d in range(grid.shape[1]):
        for c in range(grid.shape[2]):
            for t in range(grid.shape[3]):
                ranks = [int(grid[plan.first_rank, d, c, t]), int(grid[plan.last_rank, d, c, t])]
                g = dist.new_group(ranks)
                if me in ranks:
                    mine = g
    return mine


class Pipeline:
    """This rank's stages and the schedule; runs one optimizer step's forward and backward."""

    def __init__(self, plan: PipelinePlan, views: list[StageModule], model: nn.Module, mesh,
                 device: torch.device, micro_batch_size: int, seq_len: int, hidden: int,
                 seq_shard: int = 1):
        from torch.distributed import pipelining

        self.plan, self.views, self.model, self.mesh, self.device = plan, views, model, mesh, device
        self.pp_group = mesh.group("pp")
        self.pp_rank = mesh.rank("pp")
        # parameters the first and the last stage both hold (tied embedding): summed between them
        self.shared_params = model.cfg.spec.pipeline.shared_params(model)
        self.embed_group = embedding_group(mesh, plan, bool(self.shared_params))
        self.has_first = any(v.is_first for v in views)
        self.has_last = any(v.is_last for v in views)
        self.act_shape = (micro_batch_size, seq_len // seq_shard, hidden)
        self.act_dtype = act_dtype = views[0].act_dtype
        stage_cls = _timed_stage_class()
        self.stages = []
        for v in views:
            if v.is_first:
                inp = torch.empty((micro_batch_size, seq_len), dtype=torch.long, device="meta")
            else:
                inp = torch.empty(self.act_shape, dtype=act_dtype, device="meta", requires_grad=True)
            out = (torch.empty((), dtype=torch.float32, device="meta") if v.is_last
                   else torch.empty(self.act_shape, dtype=act_dtype, device="meta", requires_grad=True))
            self.stages.append(stage_cls(v, v.stage_index, plan.num_stages, device, input_args=inp,
                                         output_args=out, group=self.pp_group))
        cls = getattr(pipelining.schedules, SCHEDULES[plan.schedule].cls)
        kwargs = dict(n_microbatches=plan.microbatches, loss_fn=_loss_passthrough, scale_grads=False)
        self.schedule = cls(self.stages if SCHEDULES[plan.schedule].multi else self.stages[0], **kwargs)
        self.last_busy_s = 0.0

    def step(self, micro: list[dict[str, torch.Tensor]], meter: Any, objective: Any,
             document_mask: bool = True) -> None:
        """Forward + backward of every micro-batch through the schedule for `objective` (a
        `megaqwen.train.objective.Objective`): the last chunk adds each micro-batch's objective
        parts and every chunk its share of the model's aux terms to `meter` (a
        `megaqwen.train.objective.StepMeter`), whose `reduce` sums them over the pp group."""
        if len(micro) != self.plan.microbatches:
            raise ValueError(f"pipeline built for {self.plan.microbatches} micro-batches, got {len(micro)}")
        batch = {k: torch.cat([b[k] for b in micro]).to(self.device) for k in micro[0]}
        for v in self.views:
            v.meter, v.objective = meter, objective
        for st in self.stages:
            st.busy_s = 0.0
        kwargs = {"position_ids": batch["position_ids"], **{f: batch[f] for f in objective.fields}}
        if document_mask:
            kwargs["document_ids"] = batch["document_ids"]
        args = (batch["tokens"],) if self.has_first else ()
        target = batch[objective.fields[0]] if self.has_last else None
        try:
            self.schedule.step(*args, target=target, return_outputs=False, **kwargs)
        finally:
            for v in self.views:
                v.meter = v.objective = None
        self.last_busy_s = sum(st.busy_s for st in self.stages)

    @torch.no_grad()
    def forward_only(self, batch: dict[str, torch.Tensor], head: Any, fields: tuple[str, ...] = (),
                     document_mask: bool = True) -> Any:
        """One micro-batch forward, stage after stage (no schedule needed without backward); the
        last chunk returns `head(model, h, batch fields)` (an objective, or any function of the final
        hidden states, e.g. per-token log-probabilities). Returns that result on the pp rank
        holding the last stage (this rank's cp shard of it), None on the others."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        kw = {"position_ids": batch["position_ids"], **{f: batch[f] for f in fields},
              "document_ids": batch["document_ids"] if document_mask else None}
        shape = (batch["tokens"].shape[0], *self.act_shape[1:])
        by_stage = {v.stage_index: v for v in self.views}
        x, result = None, None
        for s in range(self.plan.num_stages):
            if self.plan.stage_rank(s) != self.pp_rank:
                continue
            v = by_stage[s]
            if s == 0:
                x = batch["tokens"]
            elif self.plan.stage_rank(s - 1) != self.pp_rank:
                x = torch.empty(shape, dtype=self.act_dtype, device=self.device)
                dist.recv(x, group=self.pp_group, group_src=self.plan.stage_rank(s - 1))
            v.objective = head
            try:
                y = v(x, **kw)
            finally:
                v.objective = None
            if v.is_last:
                result = v.records.pop()
            elif self.plan.stage_rank(s + 1) != self.pp_rank:
                dist.send(y.contiguous(), group=self.pp_group, group_dst=self.plan.stage_rank(s + 1))
            x = y
        return result

    def eval_parts(self, batch: dict[str, torch.Tensor], objective: Any, document_mask: bool = True):
        """Forward only, one micro-batch: (objective sum, units, metric sums) of `objective` (its
        declared `metrics`), summed over the cp group, the same on every pp rank."""
        names = sorted(getattr(objective, "metrics", ()))
        parts = self.forward_only(batch, objective, objective.fields, document_mask)
        out = torch.zeros(2 + len(names), device=self.device)
        if parts is not None:
            metrics = getattr(parts, "metrics", {})
            out = torch.stack([parts.sum.detach().float(), torch.as_tensor(parts.count).float().to(out),
                               *(metrics[n].detach().float() for n in names)])
            cp_group = self.views[-1].cp_group
            if cp_group is not None:  # this rank's sequence shard: sum over the cp group
                dist.all_reduce(out, group=cp_group)
        dist.all_reduce(out, group=self.pp_group)
        return EvalParts(out[0], out[1], dict(zip(names, out[2:], strict=True)))

    def reduce_grads(self, dp_mode: str, exclude: set[str] = frozenset()) -> None:
        """After the schedule: average gradients over dp (x cp) for ddp/zero1 (FSDP2 reduce-scattered
        them already), except `exclude` (expert parameters under ep > 1: reduced over their own
        group), then sum the tied embedding's two copies over the embedding group."""
        from torch.distributed.tensor import DTensor

        from megaqwen.parallel.data_parallel import dp_reduce_mesh

        params = [p for n, p in self.model.named_parameters() if p.grad is not None and n not in exclude]
        dp_mesh = dp_reduce_mesh(self.mesh)
        if dp_mode != "fsdp" and dp_mesh.size() > 1:
            _all_reduce_mean([p.grad for p in params], dp_mesh.get_group(), dp_mesh.size())
        if self.embed_group is not None:
            for name in self.shared_params:
                g = self.model.get_parameter(name).grad
                if g is not None:
                    dist.all_reduce(g.to_local() if isinstance(g, DTensor) else g, group=self.embed_group)

    def stage_peaks(self, local_peak_gib: float) -> list[float]:
        """Peak memory of every pp rank (collective over the pp group)."""
        t = torch.tensor([local_peak_gib], dtype=torch.float64, device=self.device)
        out = [torch.zeros_like(t) for _ in range(self.plan.pp)]
        dist.all_gather(out, t, group=self.pp_group)
        return [float(x) for x in out]


def _all_reduce_mean(grads: list[torch.Tensor], group, size: int, bucket_bytes: int = 25 << 20) -> None:
    """Average gradients over `group` in flat buckets of about `bucket_bytes` (one all-reduce each)."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    bucket: list[torch.Tensor] = []
    nbytes = 0

    def flush():
        if not bucket:
            return
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat, group=group)
        flat /= size
        for g, f in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            g.copy_(f)
        bucket.clear()

    for g in grads:
        if bucket and (g.dtype != bucket[0].dtype or nbytes + g.numel() * g.element_size() > bucket_bytes):
            flush()
            nbytes = 0
        bucket.append(g)
        nbytes += g.numel() * g.element_size()
    flush()
