"""Expert tensor parallelism and the expert mesh folded over the attention mesh: what a layout costs.

Why. With tp > 1 the MoE block's input is replicated over the tp group (or all-gathered from its
sequence shards), so if every tp rank held its experts whole, each would run every row through them:
tp-fold repeated expert FLOPs and expert weights (Qwen2-57B-A14B at tp=4: 4x the expert work). The
experts get their own mesh over the same ranks instead (Megatron-Core's "MoE parallel folding":
attention tp x cp x dp, experts etp x ep x edp), chosen by `parallel.etp`:

    etp = tp   each expert's intermediate dim split over the tp group (gate/up column-parallel, down
               row-parallel: the partial outputs summed over the group). Every tp rank routes the
               same rows, each computes its I/tp slice: no repeat, 1/tp of the expert weights.
    etp = 1    the tp group's rows cut into tp parts (sequence-parallel dispatch: the expert-sorted
               rows chunked evenly, so the parts are balanced whatever the routing), each part
               dispatched by its own rank; ep may then span tp ranks (ep | dp*cp*tp), e.g.
               ep = dp*tp: experts whole, 1/(dp*tp) of them per rank. (The dispatcher also runs
               1 < etp < tp, parts of etp ranks each; the layout validation refuses it because
               checkpoints describe expert-TP shards over the whole tp group.)
    etp = 0    experts whole on every tp rank (the layout before; for comparison).

The model's plan slices the weights (`megaqwen.models.qwen2_moe.parallelize`), `expert_parallel`
builds the groups (`ep_groups`) and installs the dispatcher that does the collectives; this module
is the arithmetic: per-rank expert FLOPs, all-to-all and expert-TP bytes of a layout, for the
planner and the benchmark (`benchmarks/bench_moe.py` checks it against the dispatcher's counters).
Routing is assumed balanced (each expert gets A/E rows); a real step's counts vary around it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExpertLayoutCost:
    """One rank, one micro-batch, all sparse layers, forward + backward."""

    expert_flops: float
    """Routed-expert GEMM FLOPs this rank runs (6*H*I per row forward, twice that backward)."""
    a2a_bytes: float
    """Bytes this rank sends to other ranks in the token all-to-alls (dispatch + combine, forward and
    backward)."""
    etp_bytes: float
    """Bytes this rank sends for expert TP (the etp all-reduces, forward and backward, ring) and the
    parts' all-gathers."""
    expert_param_bytes: float
    """Routed-expert weights held by this rank (in `param_bytes` per element)."""


def expert_layout_cost(tokens: int, hidden: int, moe_intermediate: int, experts: int, top_k: int,
                       sparse_layers: int, tp: int, ep: int, etp: int = -1, act_bytes: int = 2,
                       param_bytes: int = 2) -> ExpertLayoutCost:
    """Per-rank expert cost of a layout. `tokens`: rows one tp group's micro-batch holds (micro-batch
    x seq_len / cp); `etp` as `parallel.etp` (-1 = tp, 0 = replicated experts). Raises ValueError for
    a layout the dispatcher cannot run (etp not dividing tp, experts or width not divisible)."""
    etp = tp if etp == -1 else etp
    if etp < 0 or (etp and tp % etp):
        raise ValueError(f"etp={etp} must be -1, 0 or a divisor of tp={tp}")
    if experts % ep or (etp and moe_intermediate % etp):
        raise ValueError(f"the model's {experts} routed experts must divide by ep={ep} and their "
                         f"intermediate width {moe_intermediate} by etp={etp}")
    parts, width = (tp // etp, moe_intermediate // etp) if etp else (1, moe_intermediate)
    rows = tokens * top_k / parts  # assignments this rank's part dispatches (and, balanced, receives)
    flops = 3 * 6 * hidden * width * rows * sparse_layers
    row = hidden * act_bytes
    a2a = 4 * rows * (ep - 1) / ep * row * sparse_layers  # dispatch + combine, forward + backward
    k = etp if etp else 1
    etp_bytes = 2 * 2 * (k - 1) / k * rows * row  # all-reduce forward, copy_to's all-reduce backward
    etp_bytes += 2 * (parts - 1) * rows * row  # parts all-gathered forward, grads backward
    weights = 3 * hidden * width * experts // ep * sparse_layers * param_bytes
    return ExpertLayoutCost(flops, a2a, etp_bytes * sparse_layers, weights)
