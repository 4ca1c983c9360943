from megaqwen.models.config import PUBLISHED, ModelConfig, get_config
from megaqwen.models.qwen2 import Qwen2ForCausalLM, build_model

__all__ = ["PUBLISHED", "ModelConfig", "Qwen2ForCausalLM", "build_model", "get_config"]
