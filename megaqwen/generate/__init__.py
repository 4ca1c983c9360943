"""Generation engines (native KV-cache decoder | vLLM | transformers) behind one interface: see
`megaqwen.generate.api`."""

from megaqwen.generate.api import KINDS, Completion, Engine, SamplingParams, build_engine

__all__ = ["KINDS", "Completion", "Engine", "SamplingParams", "build_engine"]
