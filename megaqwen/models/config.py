"""Typed model configuration for the Qwen2.5 dense decoder.

Published sizes carry the values of the official Hugging Face `config.json` files; `debug` is a tiny
flavour for tests and the README demo. YAML twins of these live in `conf/model/`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class ModelConfig:
    name: str = "debug"
    """Flavour name, for logs and checkpoint metadata."""
    arch: str = "qwen2"
    """Architecture: the registered model spec that builds, parallelises and converts it."""
    vocab_size: int = 151_936
    """Rows of the embedding table (the tokenizer's 151,665 ids padded up, as in the official config)."""
    hidden_size: int = 64
    """Residual stream width d_model."""
    intermediate_size: int = 176
    """SwiGLU inner width (gate and up projections each map hidden -> intermediate)."""
    num_layers: int = 2
    """Number of decoder layers."""
    num_heads: int = 4
    """Query heads."""
    num_kv_heads: int = 2
    """Key/value heads (GQA); must divide num_heads."""
    head_dim: int | None = None
    """Per-head width; None means hidden_size // num_heads (true for every Qwen2.5 size)."""
    rope_theta: float = 10_000.0
    """RoPE base. Pre-training stage 1 uses 10,000; context extension raises it to 1e6 (Turbo: 1e7)."""
    rms_norm_eps: float = 1e-6
    """Epsilon inside RMSNorm's rsqrt."""
    max_position_embeddings: int = 4096
    """Longest context the config is meant for (metadata; RoPE tables are built on demand)."""
    tie_word_embeddings: bool = True
    """Share the input embedding with the LM head (0.5B, 1.5B, 3B)."""
    qkv_bias: bool = True
    """Bias on q/k/v projections (Qwen2 has it; o_proj and the MLP do not)."""
    init_std: float = 0.02
    """Std of the normal init for linear and embedding weights."""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim_

    @property
    def head_dim_(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    def validate(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads")
        for f in positive:
            if getattr(self, f) <= 0:
                raise ValueError(f"model {self.name!r}: {f} must be positive, got {getattr(self, f)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model {self.name!r}: num_heads={self.num_heads} is not divisible by "
                f"num_kv_heads={self.num_kv_heads} (GQA needs whole groups of query heads per KV head)")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"model {self.name!r}: hidden_size={self.hidden_size} is not divisible by "
                f"num_heads={self.num_heads}; set head_dim explicitly")
        if self.head_dim_ % 2:
            raise ValueError(f"model {self.name!r}: head_dim={self.head_dim_} must be even for RoPE")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ValueError(f"model {self.name!r}: rope_theta and rms_norm_eps must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def num_params(self, include_embedding: bool = True) -> int:
        """Closed-form parameter count (equals counting a built model; see tests)."""
        h, i, hd = self.hidden_size, self.intermediate_size, self.head_dim_
        q, kv = self.num_heads * hd, self.kv_dim
        bias = (q + 2 * kv) if self.qkv_bias else 0
        layer = h * q + 2 * h * kv + bias + q * h + 3 * h * i + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + h + (emb if include_embedding else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * non-embedding-input params + causal attention term.

        The LM head matmul counts (it is a real GEMM); the embedding lookup does not. Attention
        score and value GEMMs add 6 * n_layers * seq_len * (q width) per token: 12·L·s·d halved
        for causal masking (PaLM appendix B / Megatron's MFU formula).
        """
        n = self.num_params(include_embedding=False) + self.vocab_size * self.hidden_size
        attn = 6 * self.num_layers * seq_len * self.num_heads * self.head_dim_
        return 6 * n + attn


# Official Hugging Face configs (Qwen/Qwen2.5-*/config.json). vocab_size is the padded embedding
# size, which differs between the small (151,936) and large (152,064) checkpoints.
PUBLISHED: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                         num_kv_heads=2, vocab_size=151_936, tie_word_embeddings=True,
                         rms_norm_eps=1e-6),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
                         num_kv_heads=2, vocab_size=151_936, tie_word_embeddings=True,
                         rms_norm_eps=1e-6),
    "qwen2.5-3b": dict(hidden_size=2048, intermediate_size=11008, num_layers=36, num_heads=16,
                       num_kv_heads=2, vocab_size=151_936, tie_word_embeddings=True,
                       rms_norm_eps=1e-6),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                       num_kv_heads=4, vocab_size=152_064, tie_word_embeddings=False,
                       rms_norm_eps=1e-6),
    "qwen2.5-14b": dict(hidden_size=5120, intermediate_size=13824, num_layers=48, num_heads=40,
                        num_kv_heads=8, vocab_size=152_064, tie_word_embeddings=False,
                        rms_norm_eps=1e-5),
    "qwen2.5-32b": dict(hidden_size=5120, intermediate_size=27648, num_layers=64, num_heads=40,
                        num_kv_heads=8, vocab_size=152_064, tie_word_embeddings=False,
                        rms_norm_eps=1e-5),
    "qwen2.5-72b": dict(hidden_size=8192, intermediate_size=29568, num_layers=80, num_heads=64,
                        num_kv_heads=8, vocab_size=152_064, tie_word_embeddings=False,
                        rms_norm_eps=1e-5),
}


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """A published or debug config by name, with field overrides."""
    if name == "debug":
        return ModelConfig(**overrides)
    if name not in PUBLISHED:
        raise ValueError(f"unknown model {name!r}; choose from {['debug', *PUBLISHED]}")
    return ModelConfig(name=name, rope_theta=1_000_000.0, max_position_embeddings=32_768,
                       **{**PUBLISHED[name], **overrides})
