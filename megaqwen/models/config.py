"""Typed model configuration for the Qwen2.5 / Qwen3 dense decoders and their MoE families.

Published sizes carry the values of the official Hugging Face `config.json` files; `debug`,
`debug-moe`, `debug-qwen3` and `debug-qwen3-moe` are tiny flavours for tests and the README demo.
YAML twins of these live in `conf/model/`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

MOE_TWIN: dict[str, str] = {"qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}
"""Dense architecture -> its MoE sibling (same attention; num_experts > 0 exactly on the MoE one)."""
QK_NORM_ARCHS = frozenset({"qwen3", "qwen3_moe"})
"""Architectures with QK-norm and without QKV bias (Qwen3)."""
NO_SHARED_EXPERT_ARCHS = frozenset({"qwen3_moe"})
"""MoE architectures whose checkpoints have no shared expert."""


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
    rope_scaling: str = "none"
    """RoPE frequency scaling: none | yarn (Peng et al. 2023; HF `rope_scaling` type "yarn")."""
    rope_scaling_factor: float = 1.0
    """YaRN: context extension factor s (Qwen2.5's recommendation: 4, 32K trained -> 128K)."""
    rope_original_max_position: int = 0
    """YaRN: context length (tokens) the model was trained at (HF original_max_position_embeddings)."""
    rope_beta_fast: float = 32.0
    """YaRN: dims rotating more than this many times over the original context keep their frequency."""
    rope_beta_slow: float = 1.0
    """YaRN: dims rotating fewer than this many times are interpolated (divided by the factor)."""
    rope_attention_factor: float = 0.0
    """YaRN: multiplier of cos/sin (so of logits, squared); 0 means 0.1 ln(s) + 1."""
    dca_chunk_size: int = 0
    """Dual Chunk Attention (inference only): window c that relative positions stay below; 0 = off."""
    dca_local_size: int = 0
    """Dual Chunk Attention: local window w; chunks hold c - w tokens (HF dual_chunk_attention_config)."""
    max_position_embeddings: int = 4096
    """Longest context the config is meant for (metadata; RoPE tables are built on demand)."""
    tie_word_embeddings: bool = True
    """Share the input embedding with the LM head (0.5B, 1.5B, 3B)."""
    qkv_bias: bool = True
    """Bias on q/k/v projections (Qwen2 has it; o_proj and the MLP do not; Qwen3 has none)."""
    qk_norm: bool = False
    """RMSNorm over head_dim on every q and k head, before RoPE (Qwen3's QK-norm; weights (D,))."""
    init_std: float = 0.02
    """Std of the normal init for linear and embedding weights."""
    num_experts: int = 0
    """Routed experts per MoE layer (arch "qwen2_moe"); 0 means a dense model."""
    num_experts_per_tok: int = 0
    """Top-k: routed experts each token is sent to."""
    moe_intermediate_size: int = 0
    """SwiGLU inner width of each routed expert."""
    shared_expert_intermediate_size: int = 0
    """SwiGLU inner width of the always-on shared expert (sigmoid-gated); 0 means none."""
    norm_topk_prob: bool = False
    """Renormalise the top-k routing probabilities to sum to 1 (false in Qwen1.5/Qwen2 MoE)."""
    decoder_sparse_step: int = 1
    """Layer i is MoE when (i + 1) % decoder_sparse_step == 0 (and i not in mlp_only_layers)."""
    mlp_only_layers: list[int] = field(default_factory=list)
    """Layer indices forced dense (the Qwen2 MLP of intermediate_size)."""
    router_aux_loss_coef: float = 0.001
    """Weight of the Switch/GShard load-balancing loss added to the LM loss."""
    router_z_loss_coef: float = 0.0
    """Weight of the router z-loss (ST-MoE: mean squared logsumexp of the router logits); 0 = off."""
    moe_routing_bias_update_rate: float = 0.0
    """Aux-loss-free balancing (DeepSeek-V3): after each optimizer step every expert's routing bias
    moves by this much towards balance (sign update); 0 = off (no bias parameter at all)."""
    moe_capacity_factor: float = 0.0
    """Tokens an expert takes per micro-batch: ceil(factor * N * top_k / num_experts) per rank;
    assignments beyond it are dropped (counted). 0 = dropless."""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim_

    @property
    def head_dim_(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_sparse_layer(self, i: int) -> bool:
        """Whether decoder layer i is an MoE layer (HF Qwen2MoeDecoderLayer's rule)."""
        return (self.num_experts > 0 and i not in self.mlp_only_layers
                and (i + 1) % self.decoder_sparse_step == 0)

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
        self._validate_arch()
        self._validate_moe()
        self._validate_rope()

    def _validate_rope(self) -> None:
        """RoPE scaling and DCA fields: all problems named at once."""
        bad = []
        if self.rope_scaling not in ("none", "yarn"):
            bad.append(f"rope_scaling={self.rope_scaling!r}; choose none | yarn")
        if self.rope_scaling == "yarn":
            if self.rope_scaling_factor < 1:
                bad.append(f"rope_scaling_factor={self.rope_scaling_factor} must be >= 1")
            if self.rope_original_max_position <= 0:
                bad.append(f"yarn needs rope_original_max_position > 0 (the trained context), got "
                           f"{self.rope_original_max_position}")
            if self.rope_attention_factor < 0:
                bad.append(f"rope_attention_factor={self.rope_attention_factor} must be >= 0 (0: default)")
        dca = self.dca_chunk_size or self.dca_local_size
        if dca and not 0 < self.dca_local_size < self.dca_chunk_size:
            bad.append(f"DCA needs 0 < dca_local_size ({self.dca_local_size}) < dca_chunk_size "
                       f"({self.dca_chunk_size})")
        if bad:
            raise ValueError(f"model {self.name!r}: " + "; ".join(bad))

    def _validate_arch(self) -> None:
        """What the architecture's checkpoint format fixes: QK-norm and QKV bias."""
        if self.arch in QK_NORM_ARCHS and (not self.qk_norm or self.qkv_bias):
            raise ValueError(
                f"model {self.name!r}: arch {self.arch!r} has QK-norm and no QKV bias (its checkpoints "
                f"carry q_norm/k_norm and no q/k/v bias), got qk_norm={self.qk_norm}, "
                f"qkv_bias={self.qkv_bias}")
        if self.qk_norm and self.arch not in QK_NORM_ARCHS:
            raise ValueError(f"model {self.name!r}: qk_norm=true needs arch {sorted(QK_NORM_ARCHS)} "
                             f"(arch {self.arch!r} checkpoints have no q_norm/k_norm)")

    def _validate_moe(self) -> None:
        """MoE fields: all problems named at once."""
        bad = []
        dense_of = {moe: dense for dense, moe in MOE_TWIN.items()}
        if self.num_experts < 0:
            bad.append(f"num_experts={self.num_experts} must be >= 0 (0 = dense)")
        if self.arch in dense_of and self.num_experts <= 0:
            bad.append(f"arch {self.arch!r} needs num_experts > 0, got {self.num_experts}")
        if self.arch in MOE_TWIN and self.num_experts > 0:
            bad.append(f"num_experts={self.num_experts} needs arch {MOE_TWIN[self.arch]!r} "
                       f"(arch is {self.arch!r})")
        if self.arch in NO_SHARED_EXPERT_ARCHS and self.shared_expert_intermediate_size:
            bad.append(f"arch {self.arch!r} has no shared expert, got shared_expert_intermediate_size="
                       f"{self.shared_expert_intermediate_size} (use 0)")
        if self.num_experts > 0:
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                bad.append(f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                           f"[1, num_experts={self.num_experts}]")
            if self.moe_intermediate_size <= 0:
                bad.append(f"moe_intermediate_size={self.moe_intermediate_size} must be positive")
        if self.shared_expert_intermediate_size < 0:
            bad.append(f"shared_expert_intermediate_size={self.shared_expert_intermediate_size} "
                       "must be >= 0 (0 = no shared expert)")
        if self.decoder_sparse_step < 1:
            bad.append(f"decoder_sparse_step={self.decoder_sparse_step} must be >= 1")
        out = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
        if out:
            bad.append(f"mlp_only_layers {out} are outside [0, num_layers={self.num_layers})")
        if self.router_aux_loss_coef < 0:
            bad.append(f"router_aux_loss_coef={self.router_aux_loss_coef} must be >= 0")
        for f in ("router_z_loss_coef", "moe_routing_bias_update_rate", "moe_capacity_factor"):
            if getattr(self, f) < 0:
                bad.append(f"{f}={getattr(self, f)} must be >= 0 (0 = off)")
        if bad:
            raise ValueError(f"model {self.name!r}: " + "; ".join(bad))

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
        """Closed-form parameter count, every expert included (equals counting a built model)."""
        return self._count(self.num_experts, include_embedding)

    def active_params(self, include_embedding: bool = True) -> int:
        """Parameters one token runs through: only its top-k routed experts (= num_params if dense)."""
        return self._count(self.num_experts_per_tok, include_embedding)

    def _count(self, routed: int, include_embedding: bool) -> int:
        h, i, hd = self.hidden_size, self.intermediate_size, self.head_dim_
        q, kv = self.num_heads * hd, self.kv_dim
        bias = (q + 2 * kv) if self.qkv_bias else 0
        qk_norm = 2 * hd if self.qk_norm else 0
        attn_norms = h * q + 2 * h * kv + bias + q * h + 2 * h + qk_norm
        si = self.shared_expert_intermediate_size
        sparse_mlp = (self.num_experts * h + routed * 3 * h * self.moe_intermediate_size
                      + (3 * h * si + h if si else 0))  # router, experts, shared expert + its gate
        n_sparse = sum(self.is_sparse_layer(j) for j in range(self.num_layers))
        dense_mlp = 3 * h * i
        n_dense = self.num_layers - n_sparse
        layers = self.num_layers * attn_norms + n_sparse * sparse_mlp + n_dense * dense_mlp
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return layers + h + (emb if include_embedding else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * non-embedding-input (active) params + causal attention term.

        The LM head matmul counts (it is a real GEMM); the embedding lookup does not. Attention
        score and value GEMMs add 6 * n_layers * seq_len * (q width) per token: 12·L·s·d halved
        for causal masking (PaLM appendix B / Megatron's MFU formula).
        """
        n = self.active_params(include_embedding=False) + self.vocab_size * self.hidden_size
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


# Official Hugging Face configs of the public Qwen2-MoE checkpoints (Qwen/Qwen1.5-MoE-A2.7B,
# Qwen/Qwen2-57B-A14B config.json). Every layer is sparse (decoder_sparse_step 1, no mlp_only_layers).
PUBLISHED_MOE: dict[str, dict[str, Any]] = {
    "qwen1.5-moe-a2.7b": dict(hidden_size=2048, intermediate_size=5632, num_layers=24, num_heads=16,
                              num_kv_heads=16, vocab_size=151_936, tie_word_embeddings=False,
                              rms_norm_eps=1e-6, max_position_embeddings=8192, num_experts=60,
                              num_experts_per_tok=4, moe_intermediate_size=1408,
                              shared_expert_intermediate_size=5632),
    "qwen2-57b-a14b": dict(hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                           num_kv_heads=4, vocab_size=151_936, tie_word_embeddings=False,
                           rms_norm_eps=1e-6, max_position_embeddings=131_072, num_experts=64,
                           num_experts_per_tok=8, moe_intermediate_size=2560,
                           shared_expert_intermediate_size=20480),
}

# Qwen2.5-Turbo, ASSUMED: its architecture is not public. Known: an MoE of the Qwen2-MoE family with
# fine-grained experts and shared-expert routing, competitive with Qwen2.5-14B (Qwen2.5 technical
# report), 1M-token context (Qwen2.5-Turbo release; the 1M models use rope_theta 1e7 and
# max_position_embeddings 1,010,000). Assumed: Qwen2-57B-A14B's attention and width, each of its 64
# experts of 2560 split in two (128 x 1280, DeepSeekMoE-style segmentation), top-8 of those (half the
# routed compute), a shared expert 4 fine experts wide (5120), Qwen2.5's 152,064-row vocabulary:
# 52.8B total, 6.5B active parameters. Change any of it by config (every MoE size is config only).
ASSUMED_MOE: dict[str, dict[str, Any]] = {
    "qwen2.5-turbo": dict(hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                          num_kv_heads=4, vocab_size=152_064, tie_word_embeddings=False,
                          rms_norm_eps=1e-6, rope_theta=10_000_000.0,
                          max_position_embeddings=1_010_000, num_experts=128, num_experts_per_tok=8,
                          moe_intermediate_size=1280, shared_expert_intermediate_size=5120),
}

# Tiny MoE: 4 layers, layer 0 dense (mlp_only_layers), layers 1 and 3 sparse (decoder_sparse_step 2),
# 8 experts top-2 with a shared expert; the debug model's attention and vocabulary.
DEBUG_MOE: dict[str, Any] = dict(
    name="debug-moe", arch="qwen2_moe", num_layers=4, num_experts=8, num_experts_per_tok=2,
    moe_intermediate_size=48, shared_expert_intermediate_size=96, decoder_sparse_step=2,
    mlp_only_layers=[0])


# Official Hugging Face configs (Qwen/Qwen3-*/config.json). Every size: head_dim 128 (not
# hidden / heads at 0.6B, 4B, 32B and both MoE), QK-norm, no QKV bias, the 151,936-row vocabulary,
# rope_theta 1e6, rms_norm_eps 1e-6, 40,960 positions; the three small sizes tie the LM head.
QWEN3_COMMON: dict[str, Any] = dict(qk_norm=True, qkv_bias=False, head_dim=128, vocab_size=151_936,
                                    rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                                    max_position_embeddings=40_960)
PUBLISHED_QWEN3: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_layers=28, num_heads=16,
                       num_kv_heads=8, tie_word_embeddings=True),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_layers=28, num_heads=16,
                       num_kv_heads=8, tie_word_embeddings=True),
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_layers=36, num_heads=32,
                     num_kv_heads=8, tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32,
                     num_kv_heads=8, tie_word_embeddings=False),
    "qwen3-14b": dict(hidden_size=5120, intermediate_size=17408, num_layers=40, num_heads=40,
                      num_kv_heads=8, tie_word_embeddings=False),
    "qwen3-32b": dict(hidden_size=5120, intermediate_size=25600, num_layers=64, num_heads=64,
                      num_kv_heads=8, tie_word_embeddings=False),
}

# Official Hugging Face configs (Qwen/Qwen3-30B-A3B, Qwen/Qwen3-235B-A22B config.json): 128 experts,
# top-8 renormalised (norm_topk_prob true), no shared expert, every layer sparse; intermediate_size
# is in the config (a dense MLP for mlp_only_layers) but no published layer uses it.
PUBLISHED_QWEN3_MOE: dict[str, dict[str, Any]] = {
    "qwen3-30b-a3b": dict(hidden_size=2048, intermediate_size=6144, num_layers=48, num_heads=32,
                          num_kv_heads=4, moe_intermediate_size=768),
    "qwen3-235b-a22b": dict(hidden_size=4096, intermediate_size=12288, num_layers=94, num_heads=64,
                            num_kv_heads=4, moe_intermediate_size=1536),
}
QWEN3_MOE_COMMON: dict[str, Any] = dict(
    QWEN3_COMMON, arch="qwen3_moe", tie_word_embeddings=False, num_experts=128, num_experts_per_tok=8,
    norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.001)

# Tiny Qwen3 flavours: the debug attention with QK-norm and head_dim 24 != hidden / heads (q is 96
# wide, the residual 64), as Qwen3-0.6B's 2048-wide q on a 1024 residual; the MoE one mirrors
# debug-moe (layer 0 dense, 1 and 3 sparse, 8 experts top-2) without its shared expert, untied.
DEBUG_QWEN3: dict[str, Any] = dict(name="debug-qwen3", arch="qwen3", qk_norm=True, qkv_bias=False,
                                   head_dim=24)
DEBUG_QWEN3_MOE: dict[str, Any] = dict(
    DEBUG_QWEN3, name="debug-qwen3-moe", arch="qwen3_moe", num_layers=4, num_experts=8,
    num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True, decoder_sparse_step=2,
    mlp_only_layers=[0], tie_word_embeddings=False)

DEBUG: dict[str, dict[str, Any]] = {"debug": {}, "debug-moe": DEBUG_MOE, "debug-qwen3": DEBUG_QWEN3,
                                    "debug-qwen3-moe": DEBUG_QWEN3_MOE}
"""Debug flavours by name (ModelConfig defaults are the `debug` model)."""


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """A published or debug config by name, with field overrides."""
    if name in DEBUG:
        return ModelConfig(**{**DEBUG[name], **overrides})
    if name in PUBLISHED_MOE or name in ASSUMED_MOE:
        return ModelConfig(**{"name": name, "arch": "qwen2_moe", "rope_theta": 1_000_000.0,
                              "norm_topk_prob": False, "router_aux_loss_coef": 0.001,
                              **PUBLISHED_MOE.get(name, ASSUMED_MOE.get(name, {})), **overrides})
    if name in PUBLISHED_QWEN3:
        return ModelConfig(**{"name": name, "arch": "qwen3", **QWEN3_COMMON, **PUBLISHED_QWEN3[name],
                              **overrides})
    if name in PUBLISHED_QWEN3_MOE:
        return ModelConfig(**{"name": name, **QWEN3_MOE_COMMON, **PUBLISHED_QWEN3_MOE[name],
                              **overrides})
    if name not in PUBLISHED:
        names = [*DEBUG, *PUBLISHED, *PUBLISHED_MOE, *ASSUMED_MOE, *PUBLISHED_QWEN3, *PUBLISHED_QWEN3_MOE]
        raise ValueError(f"unknown model {name!r}; choose from {names}")
    return ModelConfig(name=name, rope_theta=1_000_000.0, max_position_embeddings=32_768,
                       **{**PUBLISHED[name], **overrides})
