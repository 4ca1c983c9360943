"""Typed model configuration for the Qwen2.5 / Qwen3 dense decoders and their MoE families.

The sizes themselves are not here: `conf/model/NAME.yaml` is the one table (published sizes carry
the values of the official Hugging Face `config.json` files; `debug`, `debug-moe`, `debug-qwen3` and
`debug-qwen3-moe` are tiny flavours for tests and the README demo). `get_config(NAME)` reads it the
way the trainer's `model=NAME` does.
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from megaqwen.suggest import did_you_mean

MOE_TWIN: dict[str, str] = {"qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}
"""Dense architecture -> its MoE sibling (same attention; num_experts > 0 exactly on the MoE one)."""
QK_NORM_ARCHS = frozenset({"qwen3", "qwen3_moe"})
"""Architectures with QK-norm and without QKV bias (Qwen3)."""
NO_SHARED_EXPERT_ARCHS = frozenset({"qwen3_moe"})
"""MoE architectures whose checkpoints have no shared expert."""
MOE_BALANCE = ("micro_batch", "global_batch", "sequence", "aux_free")
"""`ModelConfig.moe_balance` values (see `megaqwen.models.moe_balance`)."""
HEADS = ("lm", "score")
"""`ModelConfig.head` values: the LM head over the vocabulary, or a scalar score (reward model)."""


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
    dca_original_max_position: int = 0
    """DCA length temperature: trained context (tokens); > 0 scales logits by max(1, 0.1 ln(L/it) + 1)^2."""
    dca_variant: str = "vllm"
    """DCA positions: vllm (as vLLM/ChunkLlama, capped at c; the default) | paper (capped at c - 1)."""
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
    head: str = "lm"
    """Output head: lm (next-token logits over the vocabulary) | score (one scalar per token, HF
    `score.weight` (1, H): a reward model, exported as `*ForSequenceClassification`)."""
    pad_token_id: int = 151_643
    """Padding id (<|endoftext|>): a score head scores each row's last token that is not this id,
    as HF's sequence classifier (its `pad_token_id`) does."""
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
    """Weight of the Switch/GShard load-balancing loss added to the LM loss (the form: moe_balance)."""
    moe_balance: str = "micro_batch"
    """Load-balancing loss form (`megaqwen.models.moe_balance`): micro_batch (HF's, over one
    micro-batch and all sparse layers together) | global_batch (Qwen's, per layer over the whole
    optimizer step: all micro-batches and dp x cp ranks; Qiu et al. 2025) | sequence (per layer and
    sequence, DeepSeek-V2/V3) | aux_free (no loss trained: the routing bias of
    moe_routing_bias_update_rate balances; the micro_batch value is logged)."""
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
    def spec(self) -> Any:
        """The registered `ModelSpec` of `arch`: how generic code (parallel/, which never imports
        megaqwen.models) reaches this architecture's rules."""
        from megaqwen.models.spec import get_spec

        return get_spec(self)

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
        if self.head not in HEADS:
            raise ValueError(f"model {self.name!r}: head={self.head!r}; choose {' | '.join(HEADS)}")
        if self.head == "score" and self.tie_word_embeddings:
            raise ValueError(f"model {self.name!r}: head=score has no LM head to tie to the embedding; "
                             "set tie_word_embeddings=false with it")
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
        if self.dca_variant not in ("vllm", "paper"):
            bad.append(f"dca_variant={self.dca_variant!r}; choose vllm | paper")
        if self.dca_original_max_position < 0:
            bad.append(f"dca_original_max_position={self.dca_original_max_position} must be >= 0 (0: off)")
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
        if self.is_moe and self.moe_balance not in MOE_BALANCE:
            bad.append(f"moe_balance={self.moe_balance!r} is not one of {list(MOE_BALANCE)}")
        if self.is_moe and self.moe_balance == "aux_free" and self.moe_routing_bias_update_rate <= 0:
            bad.append("moe_balance=aux_free needs moe_routing_bias_update_rate > 0 (e.g. 0.001): "
                       "nothing else would balance the experts")
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
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings or self.head == "score" else 2)
        score = h if self.head == "score" else 0  # score.weight (1, H)
        return layers + h + score + (emb if include_embedding else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * non-embedding-input (active) params + causal attention term.

        The LM head matmul counts (it is a real GEMM); the embedding lookup does not. Attention
        score and value GEMMs add 6 * n_layers * seq_len * (q width) per token: 12·L·s·d halved
        for causal masking (PaLM appendix B / Megatron's MFU formula).
        """
        head = self.vocab_size * self.hidden_size if self.head == "lm" else 0  # score: counted in params
        n = self.active_params(include_embedding=False) + head
        attn = 6 * self.num_layers * seq_len * self.num_heads * self.head_dim_
        return 6 * n + attn


MODEL_GROUP = "model"
"""Folder of `megaqwen.conf` (the repository's `conf/`) holding one YAML per model: Hydra's `model` group."""


def _model_files() -> importlib.resources.abc.Traversable:
    return importlib.resources.files("megaqwen.conf").joinpath(MODEL_GROUP)


def model_names() -> list[str]:
    """Every model config by name: the `conf/model/*.yaml` files, what `model=NAME` accepts."""
    return sorted(f.name.removesuffix(".yaml") for f in _model_files().iterdir() if f.name.endswith(".yaml"))


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """The model config `conf/model/NAME.yaml`, with field overrides.

    The YAML is read as Hydra's `model=NAME` reads it: its keys set fields of `ModelConfig`, merged
    onto the dataclass defaults (types checked, ints widened to floats), so this equals the `model`
    section the trainer composes. Unknown keys, Hydra directives included, are errors.
    """
    cfg = copy.deepcopy(_read(name))  # a fresh object each call: callers may change its lists
    return replace(cfg, **overrides) if overrides else cfg


@functools.cache
def _read(name: str) -> ModelConfig:  # ~10 ms each (OmegaConf's structured merge), so read once
    names = model_names()
    if name not in names:
        raise ValueError(f"unknown model {name!r}{did_you_mean(name, names)}; choose from {', '.join(names)}")
    path = f"conf/{MODEL_GROUP}/{name}.yaml"
    try:
        node = OmegaConf.merge(OmegaConf.structured(ModelConfig),
                               OmegaConf.create(_model_files().joinpath(f"{name}.yaml").read_text("utf-8")))
        cfg = OmegaConf.to_object(node)
    except OmegaConfBaseException as e:  # one line: the key, then OmegaConf's reason
        hint = " (a model YAML holds only ModelConfig fields)" if isinstance(e, ConfigKeyError) else ""
        raise ValueError(f"{path}: {e.full_key}: {str(e.msg).splitlines()[0]}{hint}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not YAML: {' '.join(str(e).split())}") from None
    if cfg.name != name:
        raise ValueError(f"{path} says name: {cfg.name!r}; the name is the file's ({name!r})")
    return cfg
