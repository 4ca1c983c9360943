"""Step time and MFU of a layout: compute at an assumed kernel efficiency, the pipeline bubble, and
the communication that is not overlapped.

  model FLOPs   = flops_per_token(seq) x global tokens (6N + causal attention, PaLM appendix B; what
                  `megaqwen.parallel.metrics` reports as MFU)
  hardware FLOPs add recomputation: full re-runs each layer's forward (+1/3 of the layers' FLOPs),
                  selective the attention core's forward (2 L s q per token)
  compute       = hardware FLOPs / (GPUs x peak x efficiency); efficiency = achieved fraction of
                  the datasheet peak in the GEMMs and attention kernels (default 0.60, ASSUMED: about
                  what H100 bf16 GEMMs of these shapes sustain; Megatron-LM's own runs imply 0.5-0.65)
  bubble        = `PipelinePlan.bubble_fraction()` (GPipe/1F1B (p-1)/(m+p-1), interleaved / v, ZB-H1
                  / 3, V schedules 0 once m >= 2p): step = compute / (1 - bubble)
  tp            = 4 all-reduce-equivalents per layer and micro-batch (2 forward, 2 backward; SP's
                  all-gather + reduce-scatter move the same bytes), + 2 under full recompute, of
                  b s/cp h bf16 bytes, ring cost 2 (t-1)/t x bytes / bus bandwidth, not overlapped;
                  NVLink inside a node (tp <= 8), the NIC beyond
  ep            = 4 all-to-alls per sparse layer (dispatch and combine, forward and backward) of
                  b s/cp top_k h bf16 bytes x (ep-1)/ep, not overlapped; NIC when tp x ep > 8
  dp            = gradient reduce-scatter/all-reduce (fp32, 2 (d-1)/d x bytes; FSDP adds two bf16
                  all-gathers) over the NIC, overlapped with backward: only what exceeds the
                  backward's compute (2/3 of it) is exposed
  cp, pp        = ring K/V passes overlap the attention tiles, stage p2p sends are small: not counted
"""

from __future__ import annotations

from dataclasses import dataclass

from megaqwen.models.config import ModelConfig
from megaqwen.parallel.pipeline import plan_pipeline
from megaqwen.plan.memory import GPU, Layout, rank_param_count, routed_experts

DEFAULT_EFFICIENCY = 0.60


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


def estimate_step(m: ModelConfig, lay: Layout, gpu: GPU, seq: int, global_batch: int,
                  efficiency: float = DEFAULT_EFFICIENCY) -> StepEstimate:
    """Time of one optimizer step of `global_batch` sequences of `seq` tokens on lay.world GPUs."""
    world = lay.world
    microbatches = global_batch // (lay.micro_batch * lay.dp)
    plan = plan_pipeline(m.num_layers, lay.pp, lay.pp_schedule, lay.pp_virtual_stages, None, microbatches)
    tokens = global_batch * seq
    model_flops = m.flops_per_token(seq) * tokens
    layer_flops = model_flops - 6 * m.vocab_size * m.hidden_size * tokens
    attn_fwd = 2 * m.num_layers * seq * m.num_heads * m.head_dim_ * tokens
    extra = {"full": layer_flops / 3, "selective": attn_fwd, "none": 0.0}[lay.recompute]
    compute = (model_flops + extra) / (world * gpu.peak_flops * efficiency)
    bubble = plan.bubble_fraction()
    # per rank: its layers x its micro-batches
    layers = m.num_layers // lay.pp
    act_bytes = lay.micro_batch * seq / lay.cp * m.hidden_size * 2
    tp_comm = 0.0
    if lay.tp > 1:
        bw = gpu.intra_bw if lay.tp <= gpu.per_node else gpu.inter_bw
        n = 4 + 2 * (lay.recompute == "full")
        tp_comm = microbatches * layers * n * 2 * (lay.tp - 1) / lay.tp * act_bytes / bw
    ep_comm = 0.0
    if lay.ep > 1:
        bw = gpu.intra_bw if lay.tp * lay.ep <= gpu.per_node else gpu.inter_bw
        moe = routed_experts(m)
        ep_comm = microbatches * moe.sparse_layers / lay.pp * 4 * act_bytes * moe.active * (lay.ep - 1) / lay.ep / bw
    dpc = lay.dp * lay.cp
    dp_exposed = 0.0
    if dpc > 1:
        params = rank_param_count(m, lay, 0, fsdp=False)
        vol = 2 * (dpc - 1) / dpc * params * 4
        if lay.dp_mode in ("fsdp", "zero3"):
            vol += 2 * (dpc - 1) / dpc * params * 2
        dp_exposed = max(0.0, vol / gpu.inter_bw - 2 / 3 * compute)
    step = compute / (1 - bubble) + tp_comm + ep_comm + dp_exposed
    return StepEstimate(step, compute, bubble, tp_comm, ep_comm, dp_exposed, model_flops,
                        model_flops / (step * world * gpu.peak_flops), tokens / step)
