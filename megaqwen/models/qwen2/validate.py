"""What a parallel layout must respect to split a Qwen2-family model (`ModelSpec.validate` and the
head counts context parallelism asks for); Qwen3 shares it, `qwen2_moe/validate.py` adds the experts'."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from megaqwen.parallel.dims import padded_vocab_size


def validate(cfg: Any, dims: Any) -> list[str]:
    """The tensor-parallel splits of attention heads, KV heads, vocabulary and MLP width."""
    errors = []
    tp = dims.tp
    if cfg.num_heads % tp:
        errors.append(f"num_heads={cfg.num_heads} is not divisible by tp={tp}")
    kv = cfg.num_kv_heads
    if kv % tp and tp % kv:
        errors.append(f"num_kv_heads={kv} and tp={tp}: one must divide the other (KV heads are split "
                      f"when tp <= num_kv_heads and replicated tp/num_kv_heads times when larger)")
    if cfg.vocab_size % tp:
        errors.append(f"vocab_size={cfg.vocab_size} is not a multiple of tp={tp}; pad it to "
                      f"{padded_vocab_size(cfg.vocab_size, tp)} (model.vocab_size=...)")
    if cfg.intermediate_size % tp:
        errors.append(f"intermediate_size={cfg.intermediate_size} is not divisible by tp={tp}")
    return errors


def attention_heads(cfg: Any) -> int:
    return cfg.num_heads


def local_attention_heads(attn: nn.Module) -> int:
    """An `Attention`'s query heads on this rank: its q projection's rows (a TP shard or whole)."""
    return attn.q_proj.weight.shape[0] // attn.head_dim
