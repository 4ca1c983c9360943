"""Step time and MFU of a layout: every GEMM of a pipeline rank timed by its shape, the schedule's
bubble, and the communication the trainer does not overlap.

  GEMMs        each 2-D weight of the spec's shapes on one tp rank (`ModelSpec.param_shapes`: local
               (out, in)) is a GEMM of M = tokens per micro-batch (b s / cp) rows; a routed expert's
               of M = tokens / parts x ep x top-k / experts (what the all-to-all brings each expert;
               parts = tp / etp when etp < tp cuts the tp group's rows, else 1), its weight sliced by
               etp (`memory.layer_shapes`; etp = 0: whole, every tp rank repeating it), the head
               on the last stage, the attention core (flash attention: M = N = s / cp, K = head dim,
               causal half) on top. Time of one GEMM, an additive roofline:
                   2 M N K / (peak x e_max) + 2 (M K + K N + M N) / HBM bandwidth   (bf16 operands)
               so efficiency rises with the GEMM's arithmetic intensity and saturates at e_max
               (ASSUMED shape: the roofline; e_max FITTED, see DEFAULT_EFFICIENCY). Backward: twice
               the forward's GEMMs (input and weight gradients, same shapes). Recomputation adds the
               layers' forward (full) or the attention core's (selective).
  elementwise  norms, activations, residuals, RoPE: memory-bound, 4 passes (written and read in the
               forward, the gradient written and read in the backward) over the activations a layer
               keeps (`memory.layer_activation_elements`, no recomputation) at HBM bandwidth.
  bubble       `parallel.bubble.bubble_fraction` for the schedule: step = compute / (1 - bubble)
  tp           4 all-reduce-equivalents per layer and micro-batch (2 forward, 2 backward; SP's
               all-gather + reduce-scatter move the same bytes), + 2 under full recompute, of
               b s/cp h bf16 bytes, ring cost 2 (t-1)/t x bytes / bus bandwidth, not overlapped;
               NVLink inside a node (tp <= 8), the NIC beyond
  ep           4 all-to-alls per sparse layer (dispatch and combine, forward and backward) of
               b s/cp / parts x top_k h bf16 bytes x (ep-1)/ep, not overlapped; NIC when the ep
               group spans more than a node (ep x etp ranks, ep x tp for etp = tp or 0); expert TP
               (etp > 1: partial outputs all-reduced, forward and backward) and the parts' all-
               gathers (etp < tp) over NVLink, not overlapped: the runtime's own arithmetic,
               `expert_cost`. Reported per rank and step: `expert_flops` (routed experts' forward +
               backward GEMM FLOPs, no recomputation; from the timed GEMMs), `a2a_bytes` and
               `etp_bytes` (bytes this rank sends)
  dp           as the trainer does it (`parallel.data_parallel`, `train.loop` `grad_sync`), over the
               NIC unless the whole job is one node:
                 ddp    fp32 gradient all-reduce once per step, during the last micro-batch's backward
                 zero1  the same, then the updated fp32 weights broadcast (not overlapped)
                 fsdp   per micro-batch a bf16 all-gather in the forward and again in the backward
                        (reshard after forward), the fp32 reduce-scatter on the last micro-batch only;
                        with fsdp_keep_gathered one forward all-gather per step
                        (`fsdp_all_gathers_per_step` counts them per unit, as a test measures)
                 zero2  bf16 reduce-scatter every micro-batch's backward, bf16 all-gather after the step
                 zero3  per micro-batch two bf16 all-gathers and a bf16 reduce-scatter
               each overlapped with the forward or backward compute of its micro-batch; what exceeds
               it is exposed
  cp, pp       ring K/V passes overlap the attention tiles, stage p2p sends are small: not counted

Error band: ERROR_BAND, the largest relative error of the predicted per-GPU throughput against
Megatron-LM's ten published runs (tests/plan/test_megatron_table1.py) with e_max fitted to them;
`search` reports layouts whose step times lie within it of each other as ties.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megaqwen.models.config import ModelConfig
from megaqwen.parallel.bubble import bubble_fraction
from megaqwen.plan.memory import (
    GPU,
    Layout,
    layer_activation_elements,
    layer_shapes,
    rank_param_count,
    routed_experts,
    stage_layers,
)

DEFAULT_EFFICIENCY = 0.72
"""e_max: the fraction of the datasheet peak the largest bf16 GEMMs reach. FITTED (one constant, the
mean log error set to 0) to Megatron-LM's ten Table 1 runs (A100, tests/plan/test_megatron_table1.py);
cuBLAS measures 0.75-0.85 on large A100/H100 GEMMs, the rest being what the kernels between them
cost beyond their HBM traffic (launches, the pipeline's sends)."""
ERROR_BAND = 0.06
"""Relative uncertainty of a step time (and so of a throughput or MFU): the largest error of the
predicted per-GPU throughput against those ten runs after the fit (5.5%, the 1T run; 0.2-5.5%, the
1.7B-18B runs with tp comm and no bubble as well as the pipelined ones), rounded up. Rankings closer
than this are ties (`search.tied`)."""


@dataclass
class StepEstimate:
    step_s: float
    compute_s: float
    bubble: float
    tp_comm_s: float
    ep_comm_s: float
    dp_exposed_s: float
    model_flops: float
    mfu: float
    tokens_per_s: float
    gemm_efficiency: float = 0.0
    """Achieved fraction of peak over the rank's GEMMs and attention (model + recompute FLOPs / time)."""
    expert_flops: float = 0.0
    """Routed-expert GEMM FLOPs of one step on the busiest rank (forward + backward, no recompute)."""
    a2a_bytes: float = 0.0
    """Bytes one rank sends in the expert all-to-alls of one step (dispatch + combine, fwd + bwd)."""
    etp_bytes: float = 0.0
    """Bytes one rank moves in the expert-TP all-reduces of one step (ring: 2 (k-1)/k x the rows)."""


def gemm_time(gpu: GPU, m: float, n: float, k: float, e_max: float,
              count: float = 1.0) -> tuple[float, float]:
    """(FLOPs, seconds) of `count` bf16 GEMMs (m x k) @ (k x n) under the additive roofline."""
    flops = 2 * m * n * k * count
    return flops, flops / (gpu.peak_flops * e_max) + count * 2 * (m * k + k * n + m * n) / gpu.hbm_bw


def forward_gemms(m: ModelConfig, lay: Layout, gpu: GPU, seq: int, layers: list[int], last: bool,
                  e_max: float, expert_out: list[float] | None = None) -> tuple[float, float, float, float]:
    """(FLOPs, seconds) of one micro-batch's forward GEMMs on a rank holding `layers` (and the head
    when `last`), then (FLOPs, seconds) of its attention cores alone; the routed experts' FLOPs are
    also added to `expert_out[0]`."""
    from megaqwen.models.spec import get_spec

    shapes = get_spec(m).param_shapes(m, lay.tp)
    per_layer = layer_shapes(m, lay)
    tokens = lay.micro_batch * seq / lay.cp
    moe = routed_experts(m)
    flops = secs = 0.0
    kinds: dict[int, list] = {}  # layers of one kind share one shapes tuple: time each kind once
    for i in layers:
        kinds.setdefault(id(per_layer[i]), [per_layer[i], 0])[1] += 1
    for tensors, n in kinds.values():
        for t in tensors:
            if len(t.shape) != 2:
                continue
            rows, count = tokens, float(n)
            if t.expert:  # each rank runs experts / ep experts, each on its share of the ep group's rows
                rows, count = tokens / lay.expert_parts * lay.ep * moe.active / moe.experts, n / lay.ep
            f, s = gemm_time(gpu, rows, t.shape[0], t.shape[1], e_max, count)
            flops, secs = flops + f, secs + s
            if t.expert and expert_out is not None:
                expert_out[0] += f
    if last:  # the head: the last stage's own 2-D weight, else (tied) the embedding's
        head = [t for t in shapes.last if len(t.shape) == 2] or [t for t in shapes.first if len(t.shape) == 2]
        for t in head:
            f, s = gemm_time(gpu, tokens, t.shape[0], t.shape[1], e_max)
            flops, secs = flops + f, secs + s
    heads = m.num_heads // lay.tp * lay.micro_batch
    s_local = seq / lay.cp
    # causal attention: QK^T and PV, half of the (s x s) tiles, per head
    af, at = gemm_time(gpu, s_local, seq / 2, m.head_dim_, e_max, 2 * heads)
    af, at = af * len(layers), at * len(layers)
    return flops + af, secs + at, af, at


SCORE_PASSES = (6, 9)
"""HBM passes over a materialised (s x s) score matrix per head, forward and backward: written by
QK^T, read and written by the softmax and by dropout (+ its mask), read by PV; the backward's
gradient written, through dropout and softmax back, read by the two GEMMs, the probabilities read by
dV. Only for attention that keeps its scores in memory (Megatron-LM 2021); flash attention keeps
them on chip."""


def estimate_step(m: ModelConfig, lay: Layout, gpu: GPU, seq: int, global_batch: int,
                  efficiency: float = DEFAULT_EFFICIENCY, scores_in_memory: bool = False) -> StepEstimate:
    """Time of one optimizer step of `global_batch` sequences of `seq` tokens on lay.world GPUs;
    `efficiency` is e_max, the fraction of peak the largest GEMMs reach; `scores_in_memory` for an
    attention without flash (the trainer's is flash: SDPA / its kernels)."""
    from megaqwen.plan.memory import stage_layers

    world = lay.world
    micro = global_batch // (lay.micro_batch * lay.dp)
    tokens = global_batch * seq
    model_flops = m.flops_per_token(seq) * tokens
    tok_mb = lay.micro_batch * seq / lay.cp
    act_bytes = tok_mb * m.hidden_size * 2
    elem = 4 * 2 * layer_activation_elements(m, "none", lay.tp, lay.sequence_parallel) * tok_mb / gpu.hbm_bw

    slowest = (0.0, 0.0, 0.0, 0.0)  # the slowest rank's (s per micro-batch, forward s, flops, layers)
    expert_fwd = 0.0  # the busiest rank's routed-expert forward FLOPs per micro-batch
    for r in range(lay.pp):
        layers, _, last = stage_layers(m, lay, r)
        ex = [0.0]
        flops, fwd, attn_flops, attn_t = forward_gemms(m, lay, gpu, seq, layers, last, efficiency, ex)
        expert_fwd = max(expert_fwd, ex[0])
        fwd += elem / 2 * len(layers)
        scores = 0.0
        if scores_in_memory:  # bf16 scores of (s / cp) x s per head, every layer
            heads = m.num_heads // lay.tp * lay.micro_batch
            scores = heads * seq / lay.cp * seq * 2 / gpu.hbm_bw * len(layers)
            fwd += SCORE_PASSES[0] * scores
            attn_t += SCORE_PASSES[0] * scores
        extra = {"full": (fwd, flops), "selective": (attn_t, attn_flops),
                 "none": (0.0, 0.0)}[lay.recompute]
        t = 3 * fwd - (3 * SCORE_PASSES[0] - sum(SCORE_PASSES)) * scores + extra[0]
        if t > slowest[0]:
            slowest = (t, fwd, 3 * flops + extra[1], len(layers))
    per_mb, fwd_mb, flops_mb, layers = slowest
    compute = micro * per_mb
    bwd_mb = per_mb - fwd_mb
    bubble = bubble_fraction(lay.pp_schedule, lay.pp, micro, lay.virtual) if lay.pp > 1 else 0.0

    tp_comm = 0.0
    if lay.tp > 1:
        bw = gpu.intra_bw if lay.tp <= gpu.per_node else gpu.inter_bw
        n = 4 + 2 * (lay.recompute == "full")
        tp_comm = micro * layers * n * 2 * (lay.tp - 1) / lay.tp * act_bytes / bw
    ep_comm = a2a = etp_bytes = 0.0
    cost = expert_cost(m, lay, seq)
    if cost is not None:
        a2a, etp_bytes = micro * cost.a2a_bytes, micro * cost.etp_bytes
        span = lay.ep * (lay.etp if 0 < lay.etp < lay.tp else lay.tp)  # ranks an ep group spans
        ep_comm = (a2a / (gpu.intra_bw if span <= gpu.per_node else gpu.inter_bw)
                   + etp_bytes / (gpu.intra_bw if lay.tp <= gpu.per_node else gpu.inter_bw))
    dp_exposed = dp_exposed_s(m, lay, gpu, micro, fwd_mb, bwd_mb)
    step = compute / (1 - bubble) + tp_comm + ep_comm + dp_exposed
    return StepEstimate(step, compute, bubble, tp_comm, ep_comm, dp_exposed, model_flops,
                        model_flops / (step * world * gpu.peak_flops), tokens / step,
                        micro * flops_mb / (compute * gpu.peak_flops) if compute else 0.0,
                        expert_flops=3 * micro * expert_fwd, a2a_bytes=a2a, etp_bytes=etp_bytes)


def expert_cost(m: ModelConfig, lay: Layout, seq: int):
    """The runtime's per-rank expert arithmetic (`parallel.expert_tensor_parallel.expert_layout_cost`,
    which the MoE benchmark checks against the dispatcher's counters) for one micro-batch on the
    fullest pipeline rank; None for a dense model. The expert width comes from the spec's shapes
    (3 matrices of H x I per expert)."""
    from megaqwen.parallel.expert_tensor_parallel import expert_layout_cost

    moe = routed_experts(m)
    if moe is None:
        return None
    per_layer = layer_shapes(m, lay)
    sparse = max(sum(any(t.expert for t in per_layer[i]) for i in stage_layers(m, lay, r)[0])
                 for r in range(lay.pp))
    width = sum(math.prod(s) for s in moe.expert_shapes) // (3 * m.hidden_size)
    return expert_layout_cost(lay.micro_batch * seq // lay.cp, m.hidden_size, width, moe.experts, moe.active,
                              sparse, lay.tp, lay.ep, lay.etp)


def fsdp_all_gathers_per_step(layers: int, microbatches: int, reshard_after_forward: bool = True,
                              keep_gathered: bool = False) -> int:
    """Parameter all-gathers per optimizer step on one rank under FSDP2 (`parallel.fsdp_step`'s
    table): L layer units + the root, gathered in every micro-batch's forward, and the units freed
    after forward (all but the last layer) re-gathered in its backward; once per step with
    keep_gathered."""
    units = layers + 1
    if keep_gathered:
        return units
    return microbatches * (units + (units - 1 if reshard_after_forward else 0))


def dp_exposed_s(m: ModelConfig, lay: Layout, gpu: GPU, micro: int, fwd_mb: float, bwd_mb: float) -> float:
    """Data-parallel communication not hidden behind compute, per step (see the module docstring)."""
    d = lay.dp * lay.cp
    if d == 1:
        return 0.0
    bw = gpu.intra_bw if lay.world <= gpu.per_node else gpu.inter_bw
    n = rank_param_count(m, lay, 0, fsdp=False)  # the rank's unsharded parameters
    ring = (d - 1) / d * n / bw  # seconds per byte-per-parameter of one all-gather / reduce-scatter
    mode = lay.dp_mode
    if mode in ("ddp", "zero1"):
        out = max(0.0, 2 * ring * 4 - bwd_mb)
        return out + (ring * 4 if mode == "zero1" else 0.0)
    if mode == "zero2":
        per_mb = max(0.0, ring * 2 - bwd_mb)
        return micro * per_mb + ring * 2
    gather = ring * 2  # bf16 working copy
    rs = ring * (4 if mode == "fsdp" else 2)
    fwd = max(0.0, gather - fwd_mb)
    if mode == "fsdp":  # reduce-scatter only on the last micro-batch (grad_sync)
        if lay.fsdp_keep_gathered:  # one forward gather per step (fsdp_all_gathers_per_step)
            return fwd + max(0.0, rs - bwd_mb)
        if not lay.fsdp_reshard_after_forward:  # no backward re-gather
            return micro * fwd + max(0.0, rs - bwd_mb)
        return micro * fwd + (micro - 1) * max(0.0, gather - bwd_mb) + max(0.0, gather + rs - bwd_mb)
    return micro * (fwd + max(0.0, gather + rs - bwd_mb))
