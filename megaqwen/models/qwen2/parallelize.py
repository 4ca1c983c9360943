"""Tensor (+ sequence) parallel plan for Qwen2, built from the generic blocks in megaqwen.parallel.

Per decoder layer (tp ranks, r = this rank's TP index):
  q/k/v/gate/up  column-parallel (output rows of block r); o/down row-parallel (input columns)
  self_attn, mlp TP regions (enter: copy / SP all-gather; leave: all-reduce / SP reduce-scatter)
  KV heads       split when tp <= num_kv_heads; when tp > num_kv_heads each rank keeps the KV head
                 its query heads use, and the tp/num_kv_heads replicas all-reduce its grad.
  norms (SP)     on (B, T/tp, H) shards, weight grads all-reduced over TP
  q/k norms      (QK-norm, Qwen3) whole (D,) on every rank over its own heads: weight grads
                 all-reduced over TP (each rank's covers its heads; replicated KV heads included,
                 since each replica's grad comes from its own query heads only)
Ends of the model: vocab-parallel embedding, column-parallel LM head over the vocabulary (a tied
head reuses the embedding's shard), vocab-parallel loss (logits never gathered); under SP the
final norm's output is all-gathered for the head.

Expects a layout already validated by `ParallelDims.validate_model` (the trainer does it once, at
start-up). Works on the meta device.
"""

from __future__ import annotations

from megaqwen.kernels.cross_entropy import LMLoss
from megaqwen.models.qwen2.model import Qwen2ForCausalLM, RMSNorm
from megaqwen.parallel.dims import ParallelMesh
from megaqwen.parallel.shards import ShardMap
from megaqwen.parallel.tensor_parallel import (
    SequenceParallelRMSNorm,
    check_linear_backend,
    column_parallel,
    even_block,
    row_parallel,
    tp_region,
    vocab_parallel_embedding,
)


def _sp_norm(norm: RMSNorm, group, gather_output: bool = False) -> SequenceParallelRMSNorm:
    return SequenceParallelRMSNorm(norm.weight, norm.eps, norm.ops.rms_norm, group, gather_output)


def parallelize_tp(model: Qwen2ForCausalLM, mesh: ParallelMesh | None, sequence_parallel: bool = False,
                   linear_backend: str = "torch") -> ShardMap:
    """Shard `model` in place over the mesh's "tp" dim; returns the pieces' ShardMap."""
    shards = ShardMap(mesh)
    if mesh is None or mesh.dims.tp == 1:
        return shards
    backend = check_linear_backend(linear_backend)
    cfg, tp = model.cfg, mesh.dims.tp
    group, r = mesh.tp_group, mesh.tp_rank
    hd = cfg.head_dim_
    reps = mesh.dims.kv_replicas(cfg.num_kv_heads)
    kv_group = mesh.tp_subgroup(reps) if reps > 1 else None
    q = even_block(cfg.num_heads * hd, tp, r)
    kv = even_block(cfg.kv_dim, tp, r) if reps == 1 else ((r // reps) * hd, hd)
    ff = even_block(cfg.intermediate_size, tp, r)

    for i, layer in model.model.layers.items():
        attn, mlp, pre = layer.self_attn, layer.mlp, f"model.layers.{i}"
        column_parallel(attn, "q_proj", f"{pre}.self_attn.q_proj", shards, *q, backend=backend)
        for name in ("k_proj", "v_proj"):
            column_parallel(attn, name, f"{pre}.self_attn.{name}", shards, *kv, replicas=reps,
                            grad_group=kv_group, backend=backend)
        row_parallel(attn, "o_proj", f"{pre}.self_attn.o_proj", shards, *q, backend=backend)
        for name in ("gate_proj", "up_proj"):
            column_parallel(mlp, name, f"{pre}.mlp.{name}", shards, *ff, backend=backend)
        row_parallel(mlp, "down_proj", f"{pre}.mlp.down_proj", shards, *ff, backend=backend)
        if attn.q_norm is not None:  # same mechanics as an SP norm: whole weight, partial grads
            attn.q_norm, attn.k_norm = _sp_norm(attn.q_norm, group), _sp_norm(attn.k_norm, group)
        tp_region(attn, group, sequence_parallel)
        tp_region(mlp, group, sequence_parallel)
        if sequence_parallel:
            layer.input_layernorm = _sp_norm(layer.input_layernorm, group)
            layer.post_attention_layernorm = _sp_norm(layer.post_attention_layernorm, group)

    vocab = even_block(cfg.vocab_size, tp, r)
    if model.model.embed_tokens is not None:
        vocab_parallel_embedding(model.model, "embed_tokens", "model.embed_tokens", shards, *vocab,
                                 group=group, sequence_parallel=sequence_parallel)
    if model.lm_head is not None:
        column_parallel(model, "lm_head", "lm_head", shards, *vocab)
    if model.model.norm is not None:
        if sequence_parallel:  # the loss all-reduces its input grad itself: backward keeps the slice
            model.model.norm = _sp_norm(model.model.norm, group, gather_output=True)
        model.criterion = LMLoss(model.criterion.ce, tp_group=group)
    return shards
