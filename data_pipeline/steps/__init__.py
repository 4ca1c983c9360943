"""Per-document steps (normalise, language id, heuristic filters, PII masking, dedup signatures)."""

from megaqwen.data_pipeline.steps.base import STEP_TYPES, Step, build_steps

__all__ = ["STEP_TYPES", "Step", "build_steps"]
