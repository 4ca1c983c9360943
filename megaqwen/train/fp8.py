"""FP8 linear layers (`train.fp8`): a compute choice, never a storage one (DESIGN 15).

Recipes, from the libraries made for them (no scaling code of ours):

  tensorwise  torchao float8: one dynamic scale per tensor (input, weight, grad_output), e4m3 forward,
              e5m2 gradients; under FSDP2 (tp=1) the weights are all-gathered in FP8
              (`enable_fsdp_float8_all_gather`) with scales precomputed once per step
  rowwise     torchao float8: one scale per row of each GEMM operand, scales rounded to powers of 2
  blockwise   torchao's 1x128 / 128x128 blockwise linear (DeepSeek-V3's), Triton kernels: CUDA sm90+
  mxfp8       torchao's MXFP8 linear (32-element blocks, e8m0 scales): CUDA sm100
With `parallel.tp_linear_backend=te` the same names pick Transformer Engine recipes instead
(`te_recipe`: tensorwise -> Float8CurrentScaling, blockwise -> Float8BlockScaling, mxfp8 ->
MXFP8BlockScaling; rowwise has none), applied by `fp8_autocast` around the forward.

What is converted: the linears inside decoder layers (`spec.layers`), except the first and last
layer (`train.fp8_skip_first_last`) and modules named in `train.fp8_skip_modules` (MoE routers by
default). The embedding, the LM head / loss and the routed experts' grouped GEMMs stay in the run's
dtype: they are not nn.Linear modules of a layer (torchao's MoE FP8 grouped GEMM needs CUDA).
Parameters keep their names and master dtype, so checkpoints and HF export do not change.

Under tensor parallelism our column/row-parallel linears hold plain local shards; `Float8TPLinear`
views them as DTensors over the tp mesh for the GEMM alone (column: input Replicate, weight Shard(0);
row: input Shard(-1), weight Shard(1)), so torchao's amax reductions run over the whole tensor and
every scale equals the one-process scale. Our own collectives around the TP region are unchanged.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from megaqwen.parallel.shards import ShardMap
from megaqwen.suggest import check_choice

log = logging.getLogger(__name__)

FP8_RECIPES = ("none", "tensorwise", "rowwise", "blockwise", "mxfp8")
TORCHAO_FLOAT8 = {"tensorwise": "tensorwise", "rowwise": "rowwise"}
"""Our name -> torchao `Float8LinearConfig.from_recipe_name`."""
TE_RECIPES = {"tensorwise": "Float8CurrentScaling", "blockwise": "Float8BlockScaling",
              "mxfp8": "MXFP8BlockScaling"}
"""Our name -> Transformer Engine recipe class (transformer_engine.common.recipe)."""
GEMM_ALIGN = 16
"""FP8 GEMMs (cuBLAS `_scaled_mm`) need both dims of the weight divisible by 16; smaller or odd
linears (e.g. a 64 -> 1 gate) stay in high precision."""


@dataclass(frozen=True)
class Fp8Settings:
    recipe: str
    """One of FP8_RECIPES."""
    skip_first_last: bool = True
    """Keep the first and last decoder layer in high precision."""
    skip_modules: tuple[str, ...] = ()
    """Module FQN suffixes (whole dotted components) kept in high precision."""
    num_layers: int = 0
    """Decoder layers in the whole model (for first/last under pipelining)."""
    fsdp_float8_all_gather: bool = False
    """FSDP2 all-gathers converted weights in FP8 (tensorwise, tp=1)."""


def check_fp8(recipe: str, device: torch.device, linear_backend: str = "torch", tp: int = 1) -> None:
    """Refuse at start-up, in one line, a recipe this machine, install or layout cannot run."""
    check_choice("train.fp8", recipe, FP8_RECIPES)
    if recipe == "none":
        return
    if recipe == "rowwise" and tp > 1 and linear_backend == "torch":
        # the row scales and the FP8 operands equal one process's, yet torchao 0.18's rowwise GEMM over
        # DTensor shards did not (9% gradient error at tp2 on the debug model, tensorwise: 4e-7)
        raise ValueError(f"train.fp8=rowwise with parallel.tp={tp} is not supported (torchao's rowwise "
                         "GEMM over tensor-parallel shards differs from one process); use train.fp8="
                         "tensorwise with tp > 1, or rowwise with tp=1 (dp/FSDP2/pp are fine)")
    if linear_backend == "te":
        if recipe not in TE_RECIPES:
            raise ValueError(f"train.fp8={recipe} has no Transformer Engine recipe (TE has "
                             f"{'|'.join(TE_RECIPES)}); use parallel.tp_linear_backend=torch for torchao's")
        try:
            import transformer_engine.common.recipe  # noqa: F401
        except ImportError as e:
            raise ValueError(f"train.fp8={recipe} with parallel.tp_linear_backend=te needs "
                             f"transformer-engine installed (GPU extra): {e}") from e
        return
    try:
        import torchao.float8  # noqa: F401
    except ImportError as e:
        raise ValueError(f"train.fp8={recipe} needs torchao: pip install -e '.[fp8]' ({e})") from e
    cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    if recipe == "blockwise" and (cap is None or cap < (9, 0)):
        raise ValueError(f"train.fp8=blockwise: torchao's blockwise FP8 linear runs Triton kernels on CUDA "
                         f"sm90+ only (this device: {device}, capability {cap}); use tensorwise or rowwise")
    if recipe == "mxfp8" and (cap is None or cap < (10, 0)):
        raise ValueError(f"train.fp8=mxfp8: torchao's MXFP8 linear needs a CUDA sm100 GPU (Blackwell) "
                         f"(this device: {device}, capability {cap}); use tensorwise or rowwise")


def _new_linear(mod: nn.Linear, s: Fp8Settings, tp_mesh, shard_dim: int | None) -> nn.Module:
    """The FP8 replacement of `mod` (same parameter objects, hence same names and master dtype)."""
    if s.recipe in TORCHAO_FLOAT8:
        from torchao.float8 import Float8LinearConfig
        from torchao.float8.float8_linear import Float8Linear

        cfg = Float8LinearConfig.from_recipe_name(TORCHAO_FLOAT8[s.recipe])
        if s.fsdp_float8_all_gather and shard_dim is None:
            from dataclasses import replace

            cfg = replace(cfg, enable_fsdp_float8_all_gather=True)
        if shard_dim is None:
            new = Float8Linear.from_float(mod, config=cfg)
        else:
            from megaqwen.train.fp8_tp import Float8TPLinear

            new = Float8TPLinear.from_local(mod, cfg, tp_mesh, shard_dim)
        return new
    if s.recipe == "blockwise":
        from torchao.prototype.blockwise_fp8_training.linear import Float8BlockwiseLinear

        new = Float8BlockwiseLinear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                    device="meta")
    else:  # mxfp8
        from torchao.prototype.moe_training.mxfp8_linear import MXFP8Linear

        new = MXFP8Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
    if shard_dim is not None:
        raise ValueError(f"train.fp8={s.recipe} with tp > 1 is not supported (torchao's {s.recipe} "
                         "linear takes no DTensor shards); use tensorwise or tp=1")
    new.weight, new.bias = mod.weight, mod.bias
    return new


def convert_linears(model: nn.Module, layers: nn.ModuleDict, shards: ShardMap, s: Fp8Settings) -> list[str]:
    """Swap, in place (on meta or real weights, before recompute/compile/FSDP2), the linears of
    `layers` that `s` selects for FP8 ones. Returns the converted module FQNs."""
    if s.recipe == "none":
        return []
    from megaqwen.parallel.tensor_parallel import LocalLinear

    names = {id(m): n for n, m in model.named_modules()}
    tp_mesh = shards.mesh.mesh["tp"] if shards.mesh is not None and shards.tp > 1 else None
    done: list[str] = []
    for key, layer in layers.items():
        if s.skip_first_last and int(key) in (0, s.num_layers - 1):
            continue
        for parent in list(layer.modules()):
            for child_name, mod in list(parent.named_children()):
                if type(mod) not in (nn.Linear, LocalLinear):
                    continue
                fqn = f"{names[id(parent)]}.{child_name}"
                if any(fqn == m or fqn.endswith("." + m) for m in s.skip_modules):
                    continue
                shard = shards.get(f"{fqn}.weight")
                full = shard.full_shape if shard is not None else tuple(mod.weight.shape)
                if any(n % GEMM_ALIGN for n in full):
                    continue
                # a TP piece gets the DTensor view; a replicated KV piece (grad_group) keeps its own
                # weight-grad sum over its replicas, as LocalLinear does
                shard_dim = shard.dim if shard is not None and tp_mesh is not None else None
                new = _new_linear(mod, s, tp_mesh, shard_dim)
                if shard_dim is not None:
                    new.grad_group = getattr(mod, "grad_group", None)
                setattr(parent, child_name, new)
                done.append(fqn)
    log.info("train.fp8=%s: %d linear(s) in FP8%s", s.recipe, len(done),
             " (first/last layer kept in high precision)" if s.skip_first_last else "")
    return done


def precompute_scales_hook(model: nn.Module) -> Callable[..., None]:
    """Optimizer post-step hook: one amax all-reduce for every FP8-all-gathered weight (torchao's
    `precompute_float8_dynamic_scale_for_fsdp`) instead of one per weight per all-gather."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    def hook(_opt, _args, _kwargs):
        precompute_float8_dynamic_scale_for_fsdp(model)

    return hook


def te_recipe(recipe: str):
    """The Transformer Engine recipe object for `recipe` (see TE_RECIPES)."""
    from transformer_engine.common import recipe as te_recipes

    return getattr(te_recipes, TE_RECIPES[recipe])()


def fp8_context(recipe: str, linear_backend: str) -> contextlib.AbstractContextManager:
    """Around a forward: TE's `fp8_autocast` with the recipe for `parallel.tp_linear_backend=te`;
    nothing for torchao (its modules were swapped at build time)."""
    if recipe == "none" or linear_backend != "te":
        return contextlib.nullcontext()
    import transformer_engine.pytorch as te

    return te.fp8_autocast(enabled=True, fp8_recipe=te_recipe(recipe))
