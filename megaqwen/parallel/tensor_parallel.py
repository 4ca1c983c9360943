"""Megatron-style tensor (+ sequence) parallel plan for the plain Qwen2 model, applied in place.

What the plan does to each decoder layer (tp ranks, r = this rank's TP index):
  q/k/v/gate/up  column-parallel: keep output rows [r*out/tp, (r+1)*out/tp) (and bias rows)
  o/down         row-parallel:    keep input columns [r*in/tp, (r+1)*in/tp)
  self_attn, mlp are the parallel regions: a pre-hook puts the input through copy_to_tp
                 (SP: gather_from_sp) and a post-hook sums the partial output with reduce_from_tp
                 (SP: reduce_scatter_to_sp), so q/k/v share one backward all-reduce.
  KV heads       split over ranks when tp <= num_kv_heads; when tp > num_kv_heads each rank keeps
                 the KV head its query heads use, and the tp/num_kv_heads replicas all-reduce that
                 weight's grad among themselves.
And to the ends of the model:
  embed_tokens   vocab-parallel: rows [r*V/tp, ...); ids outside are masked, the partial embeddings
                 are summed (SP: reduce-scattered onto sequence shards).
  lm_head        column-parallel over the vocabulary (tied models reuse the embedding shard).
  loss           ops.linear_cross_entropy gets `tp_group`: vocab-parallel CE, logits never gathered.
  SP             norms run on (B, T/tp, H) shards; their weight grads are all-reduced over TP; the
                 final norm output is all-gathered for the head.

Parameter names (FQNs) are unchanged; parameters are plain local shards tagged with `tp_shard_dim`
(0 rows, 1 columns, None replicated) and `tp_replicas` (ranks holding identical copies), which the
grad-norm and checkpoint helpers read. The model code never sees torch.distributed.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megaqwen.parallel.collectives import (
    copy_to_tp,
    gather_from_sp,
    gather_from_sp_split_grad,
    reduce_from_tp,
    reduce_scatter_to_sp,
)
from megaqwen.parallel.dims import ParallelMesh


class LocalLinear(nn.Linear):
    """`nn.Linear` over a local shard. With `grad_group`, weight/bias grads are summed over that group
    (ranks holding replicas of the same shard, e.g. a KV head at tp > num_kv_heads)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 grad_group: dist.ProcessGroup | None = None):
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.grad_group = grad_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if self.grad_group is not None:
            w = copy_to_tp(w, self.grad_group)
            b = copy_to_tp(b, self.grad_group) if b is not None else None
        return F.linear(x, w, b)


class VocabParallelEmbedding(nn.Embedding):
    """Rows [vocab_start, vocab_start + V_local) of the table; partial lookups summed over TP."""

    def __init__(self, weight: torch.Tensor, vocab_start: int, group: dist.ProcessGroup,
                 sequence_parallel: bool):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx, self.max_norm, self.norm_type = None, None, 2.0
        self.scale_grad_by_freq, self.sparse = False, False
        self.weight = nn.Parameter(weight)
        self.vocab_start = vocab_start
        self.group = group
        self.sequence_parallel = sequence_parallel

    def forward(self, ids_BT: torch.Tensor) -> torch.Tensor:
        local = (ids_BT >= self.vocab_start) & (ids_BT < self.vocab_start + self.num_embeddings)
        idx = (ids_BT - self.vocab_start).masked_fill(~local, 0)
        partial = F.embedding(idx, self.weight) * local[..., None].to(self.weight.dtype)  # (B, T, H)
        if self.sequence_parallel:
            if partial.shape[1] % dist.get_world_size(self.group):
                raise ValueError(f"sequence parallel: seq_len={partial.shape[1]} is not divisible by "
                                 f"tp={dist.get_world_size(self.group)}")
            return reduce_scatter_to_sp(partial, self.group, dim=1)  # (B, T/tp, H)
        return reduce_from_tp(partial, self.group)


def _tag(p: nn.Parameter, shard_dim: int | None, replicas: int) -> None:
    p.tp_shard_dim = shard_dim
    p.tp_replicas = replicas
    # Megatron/DeepSpeed convention: grad-norm code counts these once per TP rank, not once total.
    p.tensor_model_parallel = shard_dim is not None


def _make_linear(src: nn.Linear, rows: slice | None, cols: slice | None, backend: str,
                 grad_group: dist.ProcessGroup | None) -> nn.Module:
    w = src.weight.detach()
    w = w[rows] if rows is not None else w[:, cols]
    b = src.bias.detach()[rows] if (src.bias is not None and rows is not None) else None
    if src.bias is not None and rows is None:
        raise ValueError("row-parallel linear with a bias is not supported (o_proj/down_proj have none)")
    if backend == "te" and grad_group is None:
        import transformer_engine.pytorch as te  # optional GPU extra; see make_linear_backend

        mod = te.Linear(w.shape[1], w.shape[0], bias=b is not None, params_dtype=w.dtype, device=w.device)
        with torch.no_grad():
            mod.weight.copy_(w)
            if b is not None:
                mod.bias.copy_(b)
    else:
        mod = LocalLinear(w.clone(), b.clone() if b is not None else None, grad_group)
    return mod


def check_linear_backend(backend: str) -> str:
    """`torch` (ours) | `te` (Transformer Engine's Linear as the local GEMM, our collectives around it)."""
    if backend not in ("torch", "te"):
        raise ValueError(f"tensor-parallel linear backend must be torch|te, got {backend!r}")
    if backend == "te":
        try:
            import transformer_engine.pytorch  # noqa: F401
        except ImportError as e:
            raise ValueError("parallel.tp_linear_backend=te needs transformer-engine installed "
                             f"(GPU extra): {e}") from e
    return backend


def _region_hooks(module: nn.Module, group: dist.ProcessGroup, sequence_parallel: bool) -> None:
    """Make `module` a TP region: input (args[0]) enters, output leaves through paired collectives."""
    enter = functools.partial(gather_from_sp, dim=1) if sequence_parallel else copy_to_tp
    leave = functools.partial(reduce_scatter_to_sp, dim=1) if sequence_parallel else reduce_from_tp

    def pre(_mod, args, kwargs):
        if not args:
            raise TypeError(f"{type(_mod).__name__}: TP region expects the activation as the first "
                            "positional argument")
        return (enter(args[0], group), *args[1:]), kwargs

    def post(_mod, _args, out):
        return leave(out, group)

    module.register_forward_pre_hook(pre, with_kwargs=True)
    module.register_forward_hook(post)


def _with_tp_group(ce: Callable, group: dist.ProcessGroup) -> Callable:
    if "tp_group" not in inspect.signature(ce).parameters:
        raise ValueError(f"cross-entropy kernel {getattr(ce, '__name__', ce)!r} takes no tp_group; "
                         "tensor parallelism needs a vocab-parallel loss")
    return functools.partial(ce, tp_group=group)


def _norm_with_grad_reduce(rms_norm: Callable, group: dist.ProcessGroup) -> Callable:
    """RMSNorm whose weight grad (partial: each rank saw T/tp tokens) is summed over TP."""

    def norm(x, weight, eps):
        return rms_norm(x, copy_to_tp(weight, group), eps)

    return norm


def _set_ops(root: nn.Module, old, new) -> None:
    for m in root.modules():
        if getattr(m, "ops", None) is old:
            m.ops = new


def apply_tensor_parallel(model: nn.Module, mesh: ParallelMesh, sequence_parallel: bool = False,
                          linear_backend: str = "torch") -> nn.Module:
    """Shard a (full, unsharded) `Qwen2ForCausalLM` in place over mesh's "tp" dim; returns it.

    Call on every rank with identical full weights (same seed, or built on "meta" followed by
    `to_empty` + `init_weights()` per shard). tp == 1 leaves the model untouched.
    """
    dims = mesh.dims
    tp = dims.tp
    if tp == 1:
        return model
    cfg = model.cfg
    dims.validate_model(cfg)
    linear_backend = check_linear_backend(linear_backend)
    group, r = mesh.tp_group, mesh.tp_rank
    hd = cfg.head_dim_
    reps = dims.kv_replicas(cfg.num_kv_heads)
    kv_group = mesh.tp_subgroup(reps) if reps > 1 else None

    def cols_out(n: int) -> slice:  # this rank's block of n outputs (or inputs)
        return slice(r * n // tp, (r + 1) * n // tp)

    q_rows = cols_out(cfg.num_heads * hd)
    if reps == 1:
        kv_rows = cols_out(cfg.kv_dim)
    else:
        kv_head = r // reps
        kv_rows = slice(kv_head * hd, (kv_head + 1) * hd)
    ff_rows = cols_out(cfg.intermediate_size)

    for layer in model.model.layers.values():
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj = _make_linear(attn.q_proj, q_rows, None, linear_backend, None)
        attn.k_proj = _make_linear(attn.k_proj, kv_rows, None, linear_backend, kv_group)
        attn.v_proj = _make_linear(attn.v_proj, kv_rows, None, linear_backend, kv_group)
        attn.o_proj = _make_linear(attn.o_proj, None, q_rows, linear_backend, None)
        mlp.gate_proj = _make_linear(mlp.gate_proj, ff_rows, None, linear_backend, None)
        mlp.up_proj = _make_linear(mlp.up_proj, ff_rows, None, linear_backend, None)
        mlp.down_proj = _make_linear(mlp.down_proj, None, ff_rows, linear_backend, None)
        for lin in (attn.q_proj, mlp.gate_proj, mlp.up_proj):
            for p in lin.parameters():
                _tag(p, 0, 1)
        for lin in (attn.k_proj, attn.v_proj):
            for p in lin.parameters():
                _tag(p, 0, reps)
        for lin in (attn.o_proj, mlp.down_proj):
            _tag(lin.weight, 1, 1)
        _region_hooks(attn, group, sequence_parallel)
        _region_hooks(mlp, group, sequence_parallel)

    vocab_rows = cols_out(cfg.vocab_size)
    emb = model.model.embed_tokens
    if emb is not None:
        model.model.embed_tokens = VocabParallelEmbedding(
            emb.weight.detach()[vocab_rows].clone(), vocab_rows.start, group, sequence_parallel)
        _tag(model.model.embed_tokens.weight, 0, 1)
    if model.lm_head is not None:
        model.lm_head = _make_linear(model.lm_head, vocab_rows, None, "torch", None)
        _tag(model.lm_head.weight, 0, 1)

    old_ops = model.ops
    ce = _with_tp_group(old_ops.linear_cross_entropy, group)
    ops = dataclasses.replace(old_ops, linear_cross_entropy=ce)
    _set_ops(model, old_ops, ops)
    model.ops = ops
    for p in model.parameters():
        if not hasattr(p, "tp_shard_dim"):
            _tag(p, None, tp)

    if sequence_parallel:
        sp_ops = dataclasses.replace(ops, rms_norm=_norm_with_grad_reduce(ops.rms_norm, group))
        for layer in model.model.layers.values():
            layer.input_layernorm.ops = sp_ops
            layer.post_attention_layernorm.ops = sp_ops
        if model.model.norm is not None:
            model.model.norm.ops = sp_ops
            # the CE all-reduces its input grad itself, so backward keeps only this rank's slice
            model.model.norm.register_forward_hook(
                lambda _m, _a, out: gather_from_sp_split_grad(out, group, dim=1))
        model.register_forward_pre_hook(_full_position_ids, with_kwargs=True)
    model.tp_group = group
    model.sequence_parallel = sequence_parallel
    return model


def _full_position_ids(model, args, kwargs):
    """SP shards activations right after the embedding, so RoPE positions must come from the ids."""
    if len(args) < 3 and kwargs.get("position_ids") is None:
        tokens = args[0] if args else kwargs["tokens"]
        b, t = tokens.shape[:2]
        kwargs["position_ids"] = torch.arange(t, device=tokens.device).expand(b, t)
    return args, kwargs


def local_param_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank holds (local shards; FSDP DTensors count their local part)."""
    total = 0
    for p in model.parameters():
        t = p.to_local() if hasattr(p, "to_local") else p
        total += t.numel() * t.element_size()
    return total
