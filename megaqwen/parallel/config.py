"""Parallel layout configuration (Hydra group `parallel`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel degree (Megatron column/row sharding inside each layer)."""
    sequence_parallel: bool = False
    """Shard activations on the sequence axis around norms (needs tp > 1 to matter)."""
    pp: int = 1
    """Pipeline-parallel degree (stages of consecutive layers)."""
    pp_schedule: str = "1f1b"
    """Pipeline schedule (torch.distributed.pipelining): gpipe | 1f1b | interleaved_1f1b |
    zero_bubble (interleaved ZB-H1) | zbv | dualpipev. Micro-batches per step are
    global_batch_size / (micro_batch_size * dp)."""
    pp_virtual_stages: int = 0
    """Model chunks per pipeline rank: 0 = the schedule's default (1 for gpipe/1f1b, 2 for the
    others); > 1 interleaves (zbv and dualpipev need exactly 2)."""
    pp_layers: list[int] | None = None
    """Explicit layers per pipeline stage (pp * virtual stages entries summing to num_layers; the
    first and last may be smaller, even 0, to balance the embedding and the head); None = even."""
    cp: int = 1
    """Context-parallel degree (sequence split across ranks for attention)."""
    cp_mode: str = "ring"
    """Context-parallel attention: ring (K/V blocks passed around the cp group, zig-zag balanced) |
    alltoall (Ulysses: heads split over cp; query heads per tp rank must divide by cp)."""
    cp_tile: int = 512
    """Ring attention tile edge in tokens (scores are computed tile x tile, never (T/cp)^2)."""
    ep: int = 1
    """Expert-parallel degree (MoE experts split across ranks; ep must divide dp*cp*tp/etp)."""
    etp: int = -1
    """MoE expert tensor parallelism: -1 = tp (each expert's intermediate dim split over the tp
    group, gate/up column- and down row-parallel); 1: the tp group's tokens cut into tp parts
    dispatched separately (sequence-parallel dispatch; ep may then span tp ranks, ep | dp*cp*tp);
    0: experts whole on every tp rank, each computing all tokens (tp-fold repeated expert FLOPs,
    the pre-issue-24 layout)."""
    dp: int = -1
    """Data-parallel degree; -1 infers world_size / (tp * pp * cp)."""
    dp_mode: str = "ddp"
    """How data parallelism holds state: ddp | zero1 (sharded optimizer) | fsdp (FSDP2, ZeRO-3-like)."""
    backend: str = "auto"
    """torch.distributed backend: auto (nccl on CUDA, gloo on CPU) | nccl | gloo."""
    collective_timeout_s: float = 600.0
    """A collective that has not completed after this many seconds fails (a peer rank stopped,
    died or hangs); the error names this rank, the operation and the ranks that were elsewhere."""
    tp_linear_backend: str = "torch"
    """Local GEMM of TP linears: torch | te (Transformer Engine Linear; our collectives around it)."""
    ddp_bucket_cap_mb: float = 25.0
    """DDP gradient bucket size in MiB (all-reduces overlap backward bucket by bucket)."""
    fsdp_reshard_after_forward: bool = True
    """FSDP2: free gathered layer weights after forward (ZeRO-3) instead of keeping them (ZeRO-2-like)."""
    fsdp_keep_gathered: bool = False
    """FSDP2 with gradient accumulation: keep every unit's gathered weights from the step's first
    micro-batch to the end of its last backward (one all-gather per unit and step; memory: the whole
    model's compute-dtype weights, 2 B/param in bf16) instead of re-gathering them for every
    micro-batch's forward and backward (M (2L + 1) all-gathers, L layers). See parallel/fsdp_step.py."""
    recompute: str = "none"
    """Activation recomputation per layer: none | selective (attention core) | full (whole layer)."""
    compile: str = "auto"
    """torch.compile each decoder layer (after recomputation, before data-parallel wrapping): auto
    (on for CUDA runs of the native engine, off on CPU where it costs only compile time) | true | false."""
    zero_stage: int = 1
    """DeepSpeed engine only (train.engine=deepspeed): ZeRO stage 1, 2 or 3."""
    zero_bucket_elements: int = 10_000_000
    """DeepSpeed engine only: elements per reduce / all-gather / ZeRO-3 prefetch bucket and ZeRO-3's
    cap on live gathered parameters (DeepSpeed's own defaults, 5e8-1e9, cost GBs per rank)."""
    offload_optimizer: bool = False
    """DeepSpeed engine only: keep optimizer state in CPU memory."""
    offload_params: bool = False
    """DeepSpeed engine only, ZeRO-3: keep parameters in CPU memory between uses."""
