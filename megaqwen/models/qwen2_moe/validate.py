"""What a parallel layout must respect to split a Qwen2-MoE / Qwen3-MoE model: the dense family's
rules (`qwen2/validate.py`) plus the routed experts' over ep. Every balancing form runs under pp and
cp: the trainer's counting pre-pass (`megaqwen.train.moe_balance`) makes each stage's and shard's
term an exact share of the whole."""

from __future__ import annotations

from typing import Any

from megaqwen.models.qwen2.validate import validate as validate_dense


def validate(cfg: Any, dims: Any) -> list[str]:
    errors = validate_dense(cfg, dims)
    experts, k, ep, dp_world = cfg.num_experts, cfg.num_experts_per_tok, dims.ep, dims.dp * dims.cp
    etp = getattr(dims, "etp", 0)
    dp_world *= dims.tp // etp if etp > 0 else 1  # etp < tp: ep may span the tp parts
    if etp > 1 and cfg.moe_intermediate_size % etp:
        errors.append(f"moe_intermediate_size={cfg.moe_intermediate_size} is not divisible by etp={etp} "
                      "(expert tensor parallelism splits it)")
    if experts % ep:
        errors.append(f"num_experts={experts} is not divisible by ep={ep}; pick ep from "
                      f"{[d for d in range(1, experts + 1) if experts % d == 0 and dp_world % d == 0]}")
    if not 1 <= k <= experts:
        errors.append(f"num_experts_per_tok={k} must be in [1, num_experts={experts}]")
    return errors
