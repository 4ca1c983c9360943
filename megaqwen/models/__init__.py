from megaqwen.models.config import ModelConfig, get_config, model_names
from megaqwen.models.qwen2 import Qwen2ForCausalLM, build_model

__all__ = ["ModelConfig", "Qwen2ForCausalLM", "build_model", "get_config", "model_names"]
