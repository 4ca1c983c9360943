"""Qwen2.5 dense decoder as plain single-device PyTorch, with Hugging Face parameter names.

Legend for shapes: B batch, T tokens, H hidden, Hq/Hk query/KV heads (local to this rank once a
tensor-parallel plan has sharded the projections), D head_dim, V vocabulary, I intermediate.

No `torch.distributed` here: parallel plans (megaqwen/parallel) rewrite projections in place and
read `num_heads`/`num_kv_heads` from the attention module; the forward infers head counts from the
projection widths so sharded layers need no special case.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from megaqwen.kernels.registry import KernelOps
from megaqwen.kernels.rope import rope_cos_sin, rope_inv_freq
from megaqwen.models.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: KernelOps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps):
        super().__init__()
        self.head_dim = cfg.head_dim_
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.kv_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.kv_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.ops = ops

    def forward(self, x_BTH, cos, sin, document_ids=None):
        b, t, _ = x_BTH.shape
        q = self.q_proj(x_BTH).view(b, t, -1, self.head_dim)  # (B, T, Hq, D)
        k = self.k_proj(x_BTH).view(b, t, -1, self.head_dim)  # (B, T, Hk, D)
        v = self.v_proj(x_BTH).view(b, t, -1, self.head_dim)
        q, k = self.ops.apply_rope(q, k, cos, sin)
        out = self.ops.attention(q, k, v, document_ids=document_ids, scale=self.head_dim**-0.5)
        return self.o_proj(out.reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.ops = ops

    def forward(self, x):
        return self.down_proj(self.ops.swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.self_attn = Attention(cfg, ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.mlp = MLP(cfg, ops)

    def forward(self, x, cos, sin, document_ids=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, document_ids)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """`model.*` in HF naming: embedding, layers, final norm. Any part may be None (PP stages)."""

    def __init__(self, cfg: ModelConfig, ops: KernelOps):
        super().__init__()
        self.embed_tokens: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, ops) for i in range(cfg.num_layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps | None = None):
        super().__init__()
        self.cfg = cfg
        self.ops = ops or KernelOps()
        self.model = Decoder(cfg, self.ops)
        self.lm_head: nn.Linear | None = (
            None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) for matrices and embeddings, zeros for biases, ones for norms.

        Call again after `to_empty()` when the model was built on the meta device.
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=self.cfg.init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=self.cfg.init_std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    def head_weight(self) -> torch.Tensor:
        """(V, H) output projection: lm_head, or the input embedding when tied."""
        if self.lm_head is not None:
            return self.lm_head.weight
        if self.model.embed_tokens is None:
            raise RuntimeError("tied LM head needs the embedding on this stage")
        return self.model.embed_tokens.weight

    def hidden_states(self, tokens, position_ids=None, document_ids=None):
        """tokens (B, T) ids, or (B, T, H) activations when this stage has no embedding."""
        h = self.model.embed_tokens(tokens) if self.model.embed_tokens is not None else tokens
        b, t = h.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(t, device=h.device).expand(b, t)
        inv_freq = rope_inv_freq(self.cfg.head_dim_, self.cfg.rope_theta, device=h.device)
        cos, sin = rope_cos_sin(position_ids, inv_freq)  # (B, T, D) fp32
        for layer in self.model.layers.values():
            h = layer(h, cos, sin, document_ids)
        if self.model.norm is not None:
            h = self.model.norm(h)
        return h

    def forward(self, tokens, labels=None, position_ids=None, document_ids=None,
                reduction: str = "mean"):
        """Logits (B, T, V) without labels; the next-token loss with labels (B, T).

        labels are already shifted (labels[:, i] is the target for position i); -100 is ignored.
        """
        h = self.hidden_states(tokens, position_ids, document_ids)
        w = self.head_weight()
        if labels is None:
            return h @ w.t()
        return self.ops.linear_cross_entropy(
            h.reshape(-1, h.shape[-1]), w, labels.reshape(-1), reduction=reduction)


def build_model(cfg: ModelConfig, ops: KernelOps | None = None, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> Qwen2ForCausalLM:
    """Build on `device`; on "meta" no memory is touched (for counting and sharded init)."""
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg, ops)
    return model.to(dtype)
