"""The Qwen3-MoE model spec (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen2-MoE's, with its own build and
HF adapter (Qwen2-MoE's TP plan keeps sparse blocks whole and, through Qwen2's, the q/k norms; its
layout rules, `qwen2_moe/validate.py`, hold for Qwen3-MoE's experts too)."""

from dataclasses import replace

from megaqwen.models.qwen2_moe.spec import SPEC as QWEN2_MOE
from megaqwen.models.qwen3_moe import hf_adapter
from megaqwen.models.qwen3_moe.model import build_model
from megaqwen.models.spec import register_spec

SPEC = register_spec(replace(QWEN2_MOE, arch="qwen3_moe", build=build_model, hf=hf_adapter))
