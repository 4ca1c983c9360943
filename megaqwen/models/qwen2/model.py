"""Qwen2.5 dense decoder as plain single-device PyTorch, with Hugging Face parameter names.

Qwen3 is this decoder with three config switches the modules read (`qwen3/` registers it):
QK-norm (`qk_norm`: `self_attn.q_norm` / `k_norm`, RMSNorm over head_dim per head before RoPE), no
QKV bias (`qkv_bias`) and an explicit `head_dim` (q/k/v wider than the residual stream).

Legend for shapes: B batch, T tokens (this rank's shard under sequence parallelism), H hidden,
Hq/Hk query/KV heads (local to this rank once a tensor-parallel plan has sharded the projections),
D head_dim, V vocabulary (or this rank's slice), I intermediate, N = B*T.

The forward is three separate steps, so pipeline stages, sequence shards and micro-batches can each
run the part they own and reduce the loss exactly:
    hidden_states(tokens | activations, positions, attention metadata) -> (B, T, H)
    logits(h)                                                           -> (B, T, V)
    scores(h)   (head=score, a reward model)                            -> (B, T)
    loss(h, labels)                                                     -> LossParts(sum, count)
Positions and the attention metadata (`AttentionMeta`: packed-document boundaries) are built once
per batch and handed to every layer. Generation passes a `CachedAttention` (a KV-cache step) in the
same slot: each layer gets its `LayerCache` view and appends its keys (after RoPE) and values there
(`megaqwen.generate` drives it; training never builds one). Any of embedding, final norm and head
may be None (a pipeline stage deletes what it does not own).

No `torch.distributed` here: parallel plans (see `parallelize.py`) replace modules in place
(projections by local shards, the loss by its vocab-parallel version) and add region hooks; the
forward infers head counts from the projection widths, so sharded layers need no special case.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
import torch.nn as nn

from megaqwen.kernels.attention import AttentionMeta, CachedAttention, LayerCache
from megaqwen.kernels.cross_entropy import LMLoss, LossParts
from megaqwen.kernels.dca import dca_rope, dca_settings, uses_dca
from megaqwen.kernels.registry import KernelOps
from megaqwen.kernels.rope import rope_cos_sin, rope_inv_freq, yarn_inv_freq
from megaqwen.models.config import ModelConfig
from megaqwen.models.outputs import AuxTerm, ForwardOut


class ParamInit(NamedTuple):
    """How a parameter starts: `kind` normal | zeros | ones, with `std` for normal."""

    kind: str
    std: float = 0.0


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
        # Qwen3 QK-norm: one (D,) weight shared by every head (TP plans keep it whole on each rank)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, ops) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, ops) if cfg.qk_norm else None
        self.ops = ops

    def forward(self, x_BTH: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                attn: AttentionMeta | None = None) -> torch.Tensor:
        b, t, _ = x_BTH.shape
        q = self.q_proj(x_BTH).view(b, t, -1, self.head_dim)  # (B, T, Hq, D)
        k = self.k_proj(x_BTH).view(b, t, -1, self.head_dim)  # (B, T, Hk, D)
        v = self.v_proj(x_BTH).view(b, t, -1, self.head_dim)
        if self.q_norm is not None:  # before RoPE, as in HF Qwen3Attention
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.ops.apply_rope(q, k, *rope)
        if isinstance(attn, LayerCache):  # generation: store k (after RoPE), v; attend to all slots
            k, v = attn.append(k, v)  # (B, S, Hk, D)
        out = self.core(q, k, v, attn)  # (B, T, Hq, D)
        return self.o_proj(out.reshape(b, t, -1))

    def core(self, q, k, v, attn: AttentionMeta | None) -> torch.Tensor:
        """softmax(q k^T) v: the part selective recomputation re-runs in backward."""
        return self.ops.attention(q, k, v, attn, scale=self.head_dim**-0.5)


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

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor], attn: AttentionMeta | None = None):
        x = x + self.self_attn(self.input_layernorm(x), rope, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """`model.*` in HF naming: embedding, layers, final norm. Any part may be None (PP stages)."""

    def __init__(self, cfg: ModelConfig, ops: KernelOps):
        super().__init__()
        self.embed_tokens: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, ops) for i in range(cfg.num_layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)


class Qwen2ForCausalLM(nn.Module):
    decoder_cls: type[nn.Module] = Decoder
    """The `model.*` stack; a variant (Qwen2-MoE) names its own and keeps everything else."""

    def __init__(self, cfg: ModelConfig, ops: KernelOps | None = None):
        super().__init__()
        self.cfg = cfg
        self.ops = ops or KernelOps()
        self.model = self.decoder_cls(cfg, self.ops)
        lm = cfg.head == "lm"
        self.lm_head: nn.Linear | None = (
            nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if lm and not cfg.tie_word_embeddings
            else None)
        # reward model (cfg.head == "score"): one scalar per token, HF *ForSequenceClassification's
        # `score` with num_labels=1; whole on every tp rank (it is H numbers)
        self.score: nn.Linear | None = None if lm else nn.Linear(cfg.hidden_size, 1, bias=False)
        self.criterion = LMLoss(self.ops.linear_cross_entropy)

    def param_init(self, name: str) -> ParamInit:
        """Initial values of parameter `name`: Normal(0, init_std) for matrices and embeddings,
        zeros for biases, ones for norms. The materialiser draws them per parameter name and seed,
        so every layout starts from the same full tensors."""
        if name.endswith("norm.weight"):
            return ParamInit("ones")
        if name.endswith(".bias"):
            return ParamInit("zeros")
        return ParamInit("normal", self.cfg.init_std)

    def head_weight(self) -> torch.Tensor:
        """(V, H) output projection: lm_head, or the input embedding when tied."""
        if self.lm_head is not None:
            return self.lm_head.weight
        if self.cfg.head != "lm":
            raise RuntimeError(f"a model with head={self.cfg.head} has no LM head (use `scores`)")
        if self.model.embed_tokens is None:
            raise RuntimeError("tied LM head needs the embedding on this stage")
        return self.model.embed_tokens.weight

    def rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T) -> RoPE (cos, sin), each (B, T, D) fp32, shared by every layer;
        YaRN-scaled (frequencies and cos/sin factor) when `cfg.rope_scaling` is yarn. A model built
        with `kernels.dca.dca_ops` (inference) gets DCA's (B, T, 4, D) tables from `dca_rope`, from
        plain frequencies: vLLM ignores rope_scaling when DCA is on, and so do we."""
        c = self.cfg
        if uses_dca(self.ops):
            inv_freq = rope_inv_freq(c.head_dim_, c.rope_theta, device=position_ids.device)
            return dca_rope(position_ids, inv_freq, dca_settings(self.ops))
        if c.rope_scaling == "yarn":
            inv_freq, scale = yarn_inv_freq(
                c.head_dim_, c.rope_theta, c.rope_scaling_factor, c.rope_original_max_position,
                c.rope_beta_fast, c.rope_beta_slow, c.rope_attention_factor or None,
                device=position_ids.device)
        else:
            inv_freq, scale = rope_inv_freq(c.head_dim_, c.rope_theta, device=position_ids.device), 1.0
        return rope_cos_sin(position_ids, inv_freq, scale)

    def hidden_states(self, tokens: torch.Tensor, position_ids: torch.Tensor,
                      attn: AttentionMeta | None = None, layers: Iterable[int] | None = None,
                      final_norm: bool = True, records: list | None = None) -> torch.Tensor:
        """tokens (B, T) ids (embedded here), or (B, T, H) activations from an earlier stage ->
        (B, T, H). `layers`: the decoder layers to run (default: every one this model holds; a
        pipeline chunk passes its own); the final norm runs when `final_norm` and this model holds
        it. position_ids (B, T) are the full sequence's, whatever shard of it the activations are.
        `records`: where the layers append what `aux_terms` needs (MoE routing); None: nothing kept."""
        if tokens.is_floating_point():
            h = tokens
        elif self.model.embed_tokens is None:
            raise RuntimeError("token ids given to a model (stage) without the input embedding")
        else:
            h = self.model.embed_tokens(tokens)
        rope = self.rope(position_ids)
        names = list(self.model.layers) if layers is None else [str(i) for i in layers]
        cached = isinstance(attn, CachedAttention)  # generation: each layer gets its cache view
        for name in names:
            h = self.model.layers[name](h, rope, attn.for_layer(name) if cached else attn)
        if final_norm and self.model.norm is not None:
            h = self.model.norm(h)
        return h

    def aux_terms(self, records: list, partial: bool = False) -> dict[str, AuxTerm]:
        """Named auxiliary loss terms of one forward from its `records` (see
        `megaqwen.models.outputs`); `partial`: the records cover one pipeline stage's layers, return
        that stage's additive share. A dense model has none."""
        return {}

    def logits(self, h_BTH: torch.Tensor) -> torch.Tensor:
        """(B, T, V) next-token logits; a score head's (B, T, 1) per-token scores (HF's logits)."""
        if self.score is not None:
            return self.score(h_BTH)
        return h_BTH @ self.head_weight().t()

    def scores(self, h_BTH: torch.Tensor) -> torch.Tensor:
        """(B, T) fp32 score of every token (score head): a reward model's reward for the sequence
        ending at that token. Which token scores a row is the objective's choice
        (`megaqwen.train.reward`: the last token of the response, as HF's last non-pad token)."""
        if self.score is None:
            raise RuntimeError("scores need the score head: model.head=score (reward model)")
        return self.score(h_BTH).squeeze(-1).float()

    def loss(self, h_BTH: torch.Tensor, labels_BT: torch.Tensor) -> LossParts:
        """labels already shifted (labels[:, i] is the target of position i); -100 is ignored."""
        return self.criterion(h_BTH.reshape(-1, h_BTH.shape[-1]), self.head_weight(), labels_BT.reshape(-1))

    def token_logprobs(self, h_BTH: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
        """(B, T) fp32 log-probability of each label under the model (0 where the label is -100),
        through the same head and (vocab-parallel, chunked) cross-entropy as `loss`: the logits of
        the 152K vocabulary are never materialised whole."""
        b, t, hidden = h_BTH.shape
        nll = self.criterion.per_token(h_BTH.reshape(-1, hidden), self.head_weight(), labels_BT.reshape(-1))
        return -nll.float().view(b, t)

    @staticmethod
    def prepare_inputs(tokens: torch.Tensor, position_ids: torch.Tensor | None,
                       document_ids: torch.Tensor | AttentionMeta | None):
        """(position_ids, AttentionMeta | None) for one batch: positions default to 0..T-1 per row
        (only when `tokens` are ids), raw document ids become the batch's AttentionMeta."""
        if position_ids is None:
            if tokens.dim() != 2:
                raise ValueError("position_ids are required when the input is activations (B, T, H)")
            b, t = tokens.shape
            position_ids = torch.arange(t, device=tokens.device).expand(b, t)
        attn = document_ids if document_ids is None or isinstance(document_ids, AttentionMeta) \
            else AttentionMeta(document_ids)
        return position_ids, attn

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | AttentionMeta | None = None,
                objective: Callable | None = None, batch: dict | None = None):
        """The whole model in one call: LossParts with labels, else logits (B, T, V); a stage
        without the final norm returns its hidden states.

        position_ids default to 0..T-1 per row and may be omitted only when `tokens` are ids (the
        full sequence); document_ids (B, T) (or a prebuilt `AttentionMeta`) mask packed documents.
        With an `objective` (the trainer's, `megaqwen.train.objective`): `ForwardOut(objective(self,
        h, batch), self.aux_terms(...))`, the objective's parts of `batch` and this forward's named
        auxiliary terms (through the wrappers' forward: DDP, FSDP2 and DeepSpeed see one call).
        """
        position_ids, attn = self.prepare_inputs(tokens, position_ids, document_ids)
        if objective is not None:
            records: list = []
            h = self.hidden_states(tokens, position_ids, attn, records=records)
            return ForwardOut(objective(self, h, batch), self.aux_terms(records))
        h = self.hidden_states(tokens, position_ids, attn)
        if self.model.norm is None:
            return h
        return self.logits(h) if labels is None else self.loss(h, labels)


def build_model(cfg: ModelConfig, ops: KernelOps | None = None, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, seed: int | None = None) -> Qwen2ForCausalLM:
    """Build on `device` and initialise (see `param_init`) from `seed` (default: drawn from torch's
    global RNG, so `torch.manual_seed` fixes it). On "meta" no memory is touched: parallel plans
    are then applied and only this rank's shards materialised (`megaqwen.parallel.materialize`).
    """
    return build_on_meta(Qwen2ForCausalLM, cfg, ops, device, dtype, seed)


def build_on_meta(model_cls: type[nn.Module], cfg: ModelConfig, ops: KernelOps | None,
                  device: str | torch.device, dtype: torch.dtype, seed: int | None):
    """`model_cls(cfg, ops)` constructed on meta, then (unless `device` is meta) allocated on
    `device` and initialised from `seed` by its `param_init` (shared by the Qwen2 family)."""
    with torch.device("meta"):
        model = model_cls(cfg, ops)
    model.to(dtype)
    if torch.device(device).type == "meta":
        return model
    from megaqwen.parallel.init import materialize_single  # local import: keeps the module tiny

    return materialize_single(model, device, seed)
