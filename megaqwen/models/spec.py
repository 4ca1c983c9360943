"""A model spec bundles what the generic machinery needs to know about one architecture.

    spec = get_spec(cfg)                     # by the config's `arch`
    model = spec.build(cfg, ops, "meta")     # plain single-device model, nothing allocated
    shards = spec.parallelize_tp(model, ctx) # this architecture's TP/SP plan (a ShardMap back)
    spec.layers(model)                       # the repeated blocks: FSDP units, recompute, compile
    spec.selective_recompute                 # (module type, method) re-run in backward by "selective"
    spec.hf                                  # Hugging Face adapter: config + parameter names
    spec.param_shapes(cfg, tp)               # one tp rank's parameter shapes (the memory model's input)
    spec.mlp_activation_width(cfg)           # MLP activation width per token (the memory model's input)
    spec.pipeline                            # the pipeline split (prune, boundary modules, tied params)
    spec.validate(cfg, dims)                 # this architecture's rules for a layout: [] or the problems
    spec.expert_parallel                     # routed experts to spread over ep (MoE)
    spec.attention_heads(cfg)                # query heads per layer (CP all-to-all splits them)
    spec.local_attention_heads(module)       # ... one attention module's share on this tp rank

Each architecture (Qwen2, Qwen2-MoE, Qwen3, Qwen3-MoE) registers its own spec; `megaqwen.parallel`
and the trainer name no model's modules (TorchTitan's model spec is the model for this).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch.nn as nn


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    """Architecture key (`ModelConfig.arch`)."""
    build: Callable[..., nn.Module]
    """build(cfg, ops=None, device="cpu", dtype=fp32, seed=None) -> the single-device model."""
    parallelize_tp: Callable[..., Any]
    """parallelize_tp(model, mesh, sequence_parallel, linear_backend) -> ShardMap (in place)."""
    layers: Callable[[nn.Module], nn.ModuleDict]
    """The model's repeated blocks (a ModuleDict keyed by layer index)."""
    selective_recompute: tuple[type, str]
    """(module class, method name) whose call selective recomputation re-runs in backward."""
    hf: Any
    """HF adapter module: config_from_hf, config_to_hf, hf_key(fqn), hf_architectures."""
    mlp_activation_width: Callable[[Any], int] = lambda cfg: cfg.intermediate_size
    """Width of the MLP activations one token keeps per layer (the memory model's 4I): the dense
    MLP's intermediate size; an MoE block's top-k experts' plus its shared expert's."""
    validate: Callable[[Any, Any], list[str]] = lambda cfg, dims: []
    """validate(cfg, dims) -> why this architecture cannot run split as `dims` (a `ParallelDims`: tp,
    pp, cp, ep, dp) says: one clause per problem naming the config field, the degree and the numbers
    ("num_heads=14 is not divisible by tp=4"); [] when it fits. Pure arithmetic, before any work:
    `ParallelDims.validate_model` adds the generic rules and raises them as one ValueError."""
    expert_parallel: bool = False
    """The model has routed experts for `megaqwen.parallel.expert_parallel` to spread over ep (its MoE
    blocks follow that module's protocol: an `experts` ModuleDict and a `dispatcher` slot); a spec
    without them refuses ep > 1."""
    attention_heads: Callable[[Any], int] | None = None
    """attention_heads(cfg) -> query heads per attention layer, all tp ranks together (CP all-to-all
    splits a tp rank's share over cp); None: that split is checked at the first forward only."""
    local_attention_heads: Callable[[nn.Module], int] | None = None
    """local_attention_heads(module) -> query heads one attention-core module (`selective_recompute`'s
    class) computes on this rank, after TP; None: as for `attention_heads`."""

    pipeline: PipelineSplit | None = None
    """How the model splits into pipeline stages (None: pp > 1 is refused for this architecture)."""

    def param_shapes(self, cfg: Any, tp: int = 1) -> ParamShapes:
        """One tp rank's parameters, as this spec builds and shards them: `build` on meta, then
        `parallelize_tp` as tp rank 0 (every rank's pieces have the same shapes once the layout divides
        the model, which `plan.memory.Layout.validate` checks). Exact by construction: whatever the
        architecture declares (Qwen3's q/k norms, shared experts, biases) is counted. One layer of each
        kind (`cfg.is_sparse_layer`) is built and stands for the others: 0.1 s for Qwen3-235B-A22B,
        where the whole model on meta takes 14 s. Cached per (config, tp)."""
        key = (self.arch, repr(cfg), tp)
        if key not in _SHAPES:
            _SHAPES[key] = _param_shapes(self, cfg, tp)
        return _SHAPES[key]


class PipelineSplit(Protocol):
    """A spec's pipeline split. Stages run the model's own `hidden_states(x, positions, attn,
    layers=..., final_norm=...)`, `loss` and `aux_terms(records, partial=True)` on a model whose
    other parts were pruned (`megaqwen.parallel.pipeline`); parameter names never change."""

    def prune(self, model: nn.Module, keep_layers: set[int], first: bool, last: bool) -> None:
        """On meta: delete the layers not in `keep_layers` and the boundary modules a rank holding
        (`first`, `last`) stage does not run."""

    def boundary_modules(self, model: nn.Module, first: bool, last: bool) -> dict[str, nn.Module]:
        """The modules besides its layers a chunk runs (the pipeline registers them on the chunk, so
        FSDP2 shards them with it)."""

    def shared_params(self, model: nn.Module) -> list[str]:
        """FQNs of parameters both the first and the last stage hold (tied embeddings): their
        gradients are summed between the two."""


@dataclass(frozen=True)
class ParamShape:
    name: str
    """FQN in the plain model (`model.layers.0.self_attn.q_proj.weight`; a layer's names are those of
    the first layer of its kind, which stands for it)."""
    shape: tuple[int, ...]
    """Local shape on one tp rank."""
    expert: bool
    """A routed expert's tensor: whole over tp, split over ep (`megaqwen.parallel.expert_parallel`)."""


@dataclass(frozen=True)
class ParamShapes:
    """What one tp rank holds, by where a pipeline puts it."""

    first: tuple[ParamShape, ...]
    """The first stage's (input embedding; the last stage's too when the embedding is tied)."""
    layers: tuple[tuple[ParamShape, ...], ...]
    """Per decoder layer index."""
    last: tuple[ParamShape, ...]
    """The last stage's besides its layers (final norm, LM head)."""


_SHAPES: dict[tuple[str, str, int], ParamShapes] = {}


class _PlanningMesh:
    """Stands in for a `ParallelMesh` when a plan is applied on meta only to read shapes: tp rank 0 of
    `tp`, no process groups (the plan stores groups in its modules but calls no collective)."""

    def __init__(self, tp: int):
        from megaqwen.parallel.dims import ParallelDims

        self.dims = ParallelDims(world_size=tp, tp=tp)
        self.tp_group, self.tp_rank = None, 0

    def tp_subgroup(self, size: int, strided: bool = False) -> None:
        return None


def _param_shapes(spec: ModelSpec, cfg: Any, tp: int) -> ParamShapes:
    kinds: dict[bool, int] = {}  # layer kind -> the first layer of that kind
    for i in range(cfg.num_layers):
        kinds.setdefault(cfg.is_sparse_layer(i), i)
    n = max(kinds.values()) + 1
    small = dataclasses.replace(cfg, num_layers=n, mlp_only_layers=[i for i in cfg.mlp_only_layers if i < n])
    model = spec.build(small, device="meta")
    layers = spec.layers(model)
    for name in [k for k in layers if int(k) not in kinds.values()]:
        del layers[name]
    spec.parallelize_tp(model, _PlanningMesh(tp) if tp > 1 else None)
    experts = {f"{name}.experts." for name, m in model.named_modules()  # expert_parallel's protocol
               if isinstance(getattr(m, "experts", None), nn.ModuleDict)}

    def shapes(module: nn.Module, prefix: str) -> tuple[ParamShape, ...]:
        return tuple(ParamShape(prefix + k, tuple(p.shape), any((prefix + k).startswith(e) for e in experts))
                     for k, p in module.named_parameters())

    fqn = {id(m): name + "." for name, m in model.named_modules()}
    per_kind = {kind: shapes(layers[str(i)], fqn[id(layers[str(i)])]) for kind, i in kinds.items()}
    first = tuple(s for m in spec.pipeline.boundary_modules(model, True, False).values()
                  for s in shapes(m, fqn[id(m)]))  # what the first stage holds besides its layers
    inside = {s.name for s in first} | {s.name for group in per_kind.values() for s in group}
    last = tuple(s for s in shapes(model, "") if s.name not in inside)
    return ParamShapes(first, tuple(per_kind[cfg.is_sparse_layer(i)] for i in range(cfg.num_layers)), last)


_SPECS: dict[str, ModelSpec] = {}


def register_spec(spec: ModelSpec) -> ModelSpec:
    if spec.arch in _SPECS and _SPECS[spec.arch] is not spec:
        raise ValueError(f"model spec {spec.arch!r} is already registered")
    _SPECS[spec.arch] = spec
    return spec


def get_spec(arch_or_cfg: Any) -> ModelSpec:
    """The spec for an architecture name or a config (its `arch` field)."""
    arch = arch_or_cfg if isinstance(arch_or_cfg, str) else getattr(arch_or_cfg, "arch", "qwen2")
    _load_builtin()
    if arch not in _SPECS:
        raise ValueError(f"unknown model architecture {arch!r}; registered: {sorted(_SPECS)}")
    return _SPECS[arch]


def _load_builtin() -> None:
    import megaqwen.models.qwen2.spec  # noqa: F401  (registers "qwen2")
    import megaqwen.models.qwen2_moe.spec  # noqa: F401  (registers "qwen2_moe")
    import megaqwen.models.qwen3.spec  # noqa: F401  (registers "qwen3")
    import megaqwen.models.qwen3_moe.spec  # noqa: F401  (registers "qwen3_moe")
