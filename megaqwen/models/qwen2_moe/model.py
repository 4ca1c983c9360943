"""Qwen2-MoE decoder as plain single-device PyTorch, with Hugging Face (checkpoint) parameter names.

The Qwen2 decoder (attention, norms, RoPE, loss: imported from `megaqwen.models.qwen2.model`) with
the MLP of every sparse layer replaced by `SparseMoeBlock`:
    router     mlp.gate                 Linear H -> E, softmax, top-k (optionally renormalised)
    experts    mlp.experts.{e}.*_proj   E SwiGLU MLPs of moe_intermediate_size
    shared     mlp.shared_expert.*      one SwiGLU MLP of shared_expert_intermediate_size, scaled by
               mlp.shared_expert_gate   sigmoid(Linear H -> 1)
Which layers are sparse: `ModelConfig.is_sparse_layer` (decoder_sparse_step, mlp_only_layers);
the others keep the dense Qwen2 MLP of intermediate_size.

Legend: N tokens (B*T), H hidden, E experts, K top-k, A = N*K token->expert assignments.

Dispatch is dropless: the A assignments are sorted by expert, each expert runs one GEMM chain over
its contiguous block of tokens (a loop over experts, never over tokens), and the weighted outputs
are summed back per token with one index_add. The load-balancing loss is returned next to the LM
loss (`MoELossParts.aux`); the trainer adds `router_aux_loss_coef * aux` to the LM mean.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from megaqwen.kernels.attention import AttentionMeta
from megaqwen.kernels.cross_entropy import LossParts
from megaqwen.kernels.registry import KernelOps
from megaqwen.models.config import ModelConfig
from megaqwen.models.qwen2.model import MLP, DecoderLayer, Qwen2ForCausalLM, RMSNorm, build_on_meta


class RouterOut(NamedTuple):
    """One sparse layer's routing, kept for the load-balancing loss."""

    probs_NE: torch.Tensor
    """fp32 softmax over experts (with grad: the loss's differentiable factor)."""
    topk_NK: torch.Tensor
    """int64 chosen experts per token."""


class MoELossParts(NamedTuple):
    """LM loss pieces (exactly `LossParts`' `sum` and `count`, so code written for LossParts keeps
    working) plus the load-balancing loss of this forward, not yet multiplied by its coefficient."""

    sum: torch.Tensor
    count: torch.Tensor
    aux: torch.Tensor
    """fp32 scalar: HF's `aux_loss` (Switch/GShard form over all sparse layers of the forward)."""

    def mean(self) -> torch.Tensor:
        return self.sum / self.count.clamp(min=1)

    @property
    def lm(self) -> LossParts:
        return LossParts(self.sum, self.count)


def _mlp(cfg: ModelConfig, ops: KernelOps, width: int) -> MLP:
    return MLP(replace(cfg, intermediate_size=width), ops)


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps):
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(_mlp(cfg, ops, cfg.moe_intermediate_size)
                                     for _ in range(cfg.num_experts))
        si = cfg.shared_expert_intermediate_size
        self.shared_expert = _mlp(cfg, ops, si) if si else None
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False) if si else None

    def route(self, x_NH: torch.Tensor) -> tuple[RouterOut, torch.Tensor]:
        """-> (routing, weights (N, K) in x's dtype)."""
        probs = F.softmax(self.gate(x_NH), dim=-1, dtype=torch.float32)  # (N, E)
        w, idx = torch.topk(probs, self.top_k, dim=-1)  # (N, K)
        if self.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
        return RouterOut(probs, idx), w.to(x_NH.dtype)

    def experts_forward(self, x_NH: torch.Tensor, idx_NK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
        """Dropless grouped dispatch: sum_k w[n, k] * expert_{idx[n, k]}(x[n])."""
        n, k = idx_NK.shape
        order = torch.argsort(idx_NK.reshape(-1), stable=True)  # (A,) assignments grouped by expert
        token_A = order // k
        counts = torch.bincount(idx_NK.reshape(-1), minlength=len(self.experts)).tolist()  # one sync
        x_A = x_NH.index_select(0, token_A)  # (A, H) expert-major
        outs = [self.experts[e](chunk) for e, chunk in enumerate(x_A.split(counts)) if counts[e]]
        y_A = torch.cat(outs) * w_NK.reshape(-1)[order, None]
        return torch.zeros_like(x_NH).index_add_(0, token_A, y_A)

    def forward(self, x_BTH: torch.Tensor, router_out: list[RouterOut] | None = None) -> torch.Tensor:
        x = x_BTH.reshape(-1, x_BTH.shape[-1])  # (N, H)
        routing, w = self.route(x)
        if router_out is not None:
            router_out.append(routing)
        y = self.experts_forward(x, routing.topk_NK, w)
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y.view_as(x_BTH)


class MoeDecoderLayer(DecoderLayer):
    """Qwen2's decoder layer; its MLP is a SparseMoeBlock on sparse layers."""

    def __init__(self, cfg: ModelConfig, ops: KernelOps, sparse: bool):
        super().__init__(cfg, ops)
        if sparse:
            self.mlp = SparseMoeBlock(cfg, ops)

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor], attn: AttentionMeta | None = None,
                router_out: list[RouterOut] | None = None):
        x = x + self.self_attn(self.input_layernorm(x), rope, attn)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, router_out) if isinstance(self.mlp, SparseMoeBlock) else self.mlp(h))


class MoeDecoder(nn.Module):
    """`model.*` in HF naming, as Qwen2's Decoder. Any part may be None (PP stages)."""

    def __init__(self, cfg: ModelConfig, ops: KernelOps):
        super().__init__()
        self.embed_tokens: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): MoeDecoderLayer(cfg, ops, cfg.is_sparse_layer(i))
                                     for i in range(cfg.num_layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)


def load_balancing_loss(routing: list[RouterOut], num_experts: int) -> torch.Tensor:
    """Switch/GShard auxiliary loss exactly as HF's `load_balancing_loss_func` (no padding mask):
    E * sum_e f_e * P_e, f_e = share of top-k assignments to expert e and P_e = mean router
    probability of e, both averaged over every token of every sparse layer together."""
    if not routing:
        return torch.zeros((), dtype=torch.float32)
    rows = sum(r.probs_NE.shape[0] for r in routing)
    counts = sum(torch.bincount(r.topk_NK.reshape(-1), minlength=num_experts) for r in routing)
    probs = sum(r.probs_NE.sum(dim=0) for r in routing)
    return num_experts * torch.sum((counts.float() / rows) * (probs / rows))


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    decoder_cls = MoeDecoder

    def hidden_states(self, tokens: torch.Tensor, position_ids: torch.Tensor,
                      attn: AttentionMeta | None = None,
                      router_out: list[RouterOut] | None = None) -> torch.Tensor:
        """As Qwen2's; each sparse layer appends its routing to `router_out` when given."""
        h = self.model.embed_tokens(tokens) if self.model.embed_tokens is not None else tokens
        rope = self.rope(position_ids)
        for layer in self.model.layers.values():
            h = layer(h, rope, attn, router_out)
        if self.model.norm is not None:
            h = self.model.norm(h)
        return h

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | AttentionMeta | None = None):
        """As Qwen2's forward, but with labels the result is `MoELossParts` (LM loss + aux loss)."""
        position_ids, attn = self.prepare_inputs(tokens, position_ids, document_ids)
        routing: list[RouterOut] = []
        h = self.hidden_states(tokens, position_ids, attn, routing)
        if self.model.norm is None:
            return h
        if labels is None:
            return self.logits(h)
        lm = self.loss(h, labels)
        aux = load_balancing_loss(routing, self.cfg.num_experts).to(lm.sum.device)
        return MoELossParts(lm.sum, lm.count, aux)


def build_model(cfg: ModelConfig, ops: KernelOps | None = None, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, seed: int | None = None) -> Qwen2MoeForCausalLM:
    """As `megaqwen.models.qwen2.build_model`: built on meta, then materialised and initialised
    (router, experts and shared-expert gate: Normal(0, init_std)) unless `device` is meta."""
    return build_on_meta(Qwen2MoeForCausalLM, cfg, ops, device, dtype, seed)
