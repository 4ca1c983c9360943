"""megaqwen: Megatron-style distributed pretraining for Qwen2.5-family models."""

__version__ = "0.1.0"
