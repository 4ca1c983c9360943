"""Tiny random transformers models of each architecture, saved as HF folders (float64, so greedy
tokens never hinge on a rounding tie; float32 for MoE, whose grouped GEMM in transformers has no
float64) for the generation parity tests."""

from __future__ import annotations

from pathlib import Path

import torch
from hf_random import randomise_

COMMON = dict(vocab_size=131, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
              rope_theta=10_000.0, max_position_embeddings=256, rms_norm_eps=1e-6,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)


def dtype(arch: str) -> torch.dtype:
    return torch.float32 if "moe" in arch else torch.float64


def save_random_hf(path: Path, arch: str = "qwen2", vocab_size: int = 131) -> Path:
    from transformers import (
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    common = COMMON | {"vocab_size": vocab_size}
    if arch == "qwen2":
        cls, hc = Qwen2ForCausalLM, Qwen2Config(**common, intermediate_size=56, num_hidden_layers=2,
                                                 tie_word_embeddings=True)
    elif arch == "qwen3":
        cls, hc = Qwen3ForCausalLM, Qwen3Config(**common, intermediate_size=56, num_hidden_layers=2,
                                                 head_dim=16, tie_word_embeddings=False)
    elif arch == "qwen2_moe":
        cls, hc = Qwen2MoeForCausalLM, Qwen2MoeConfig(
            **common, intermediate_size=56, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=24, shared_expert_intermediate_size=40, decoder_sparse_step=1,
            mlp_only_layers=[0], norm_topk_prob=False, tie_word_embeddings=False)
    elif arch == "qwen3_moe":
        cls, hc = Qwen3MoeForCausalLM, Qwen3MoeConfig(
            **common, intermediate_size=56, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=24, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
            head_dim=16, tie_word_embeddings=False)
    else:
        raise ValueError(arch)
    torch.manual_seed(0)
    model = randomise_(cls(hc), mlp_std=0.2, std=0.2).to(dtype(arch))
    model.save_pretrained(path, safe_serialization=True)
    return path
