"""Generic code names no model (DESIGN 12, issue 21): what an architecture needs of a layout, its
experts and its attention heads come from its `ModelSpec`, so a new architecture is a folder under
models/ and touches nothing in parallel/.

The name check is the acceptance grep of issue 21 over parallel/, train/ and plan/ (comments
included: a comment naming a module is how a hidden dependency starts)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAMES = re.compile(r"is_moe|num_experts|embed_tokens|lm_head|q_proj|model\.model\.")
"""A model's config fields and module names (Qwen2's): generic code reaches them through the spec."""
CHECKED = sorted(p for d in ("parallel", "train", "plan") for p in (ROOT / "megaqwen" / d).glob("*.py"))
"""The generic packages: the trainer, the parallel plans and the planner."""


def test_generic_parallel_code_names_no_model():
    bad = []
    for path in CHECKED:
        rel = str(path.relative_to(ROOT))
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if MODEL_NAMES.search(line):
                bad.append(f"{rel}:{i}: {line.strip()}")
    assert not bad, "generic code naming a model (ask the model spec instead):\n" + "\n".join(bad)


def test_a_new_architecture_brings_its_own_layout_rules():
    """A spec registered outside parallel/ with its own rules and no experts: `validate_layout`
    applies them, and the generic ones, without knowing the architecture."""
    from megaqwen.models.config import get_config
    from megaqwen.models.spec import get_spec
    from megaqwen.parallel.config import ParallelConfig
    from megaqwen.parallel.dims import ParallelDims
    from megaqwen.parallel.setup import validate_layout

    toy = replace(get_spec("qwen2"), arch="toy", validate=lambda cfg, dims: (
        [f"toy layers need tp in (1, 4), got tp={dims.tp}"] if dims.tp not in (1, 4) else []),
        attention_heads=lambda cfg: 6)
    cfg = get_config("debug")  # 4 heads, 2 KV heads
    validate_layout(ParallelConfig(tp=4), ParallelDims(world_size=4, tp=4), cfg, 32, spec=toy)
    with pytest.raises(ValueError, match=r"model 'debug': toy layers need tp in \(1, 4\), got tp=2"):
        validate_layout(ParallelConfig(tp=2), ParallelDims(world_size=2, tp=2), cfg, 32, spec=toy)
    with pytest.raises(ValueError, match=r"ep=2 needs an MoE model \(arch 'toy' has no routed experts\)"):
        validate_layout(ParallelConfig(ep=2), ParallelDims(world_size=2, ep=2), cfg, 32, spec=toy)
    with pytest.raises(ValueError, match="6 query heads .* not divisible by cp=4"):  # the spec's count
        validate_layout(ParallelConfig(cp=4, cp_mode="alltoall"), ParallelDims(world_size=4, cp=4), cfg, 32,
                        spec=toy)
    validate_layout(ParallelConfig(cp=2, cp_mode="alltoall"), ParallelDims(world_size=2, cp=2), cfg, 32,
                    spec=replace(toy, attention_heads=None))  # no count: left to the first forward
