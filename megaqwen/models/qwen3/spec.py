"""The Qwen3 dense model spec (Qwen3-0.6B ... Qwen3-32B): Qwen2's, with its own build and HF adapter.

Qwen2's TP plan (which keeps the q/k norm weights whole and sums their grads over TP), layer list,
selective-recompute target (`Attention.core`) and layout rules (`qwen2/validate.py`) serve Qwen3
unchanged.
"""

from dataclasses import replace

from megaqwen.models.qwen2.spec import SPEC as QWEN2
from megaqwen.models.qwen3 import hf_adapter
from megaqwen.models.qwen3.model import build_model
from megaqwen.models.spec import register_spec

SPEC = register_spec(replace(QWEN2, arch="qwen3", build=build_model, hf=hf_adapter))
