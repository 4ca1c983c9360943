"""Hugging Face adapter of the Qwen2-MoE spec: config keys and parameter names.

Parameter names are those of the HF checkpoints (`mlp.experts.{e}.gate_proj.weight`, ...), so
`hf_key` is the identity.

Extras stock transformers does not know (written only when set, read back on import):
  config.json  router_z_loss_coef, moe_routing_bias_update_rate, moe_capacity_factor
  safetensors  model.layers.{i}.mlp.gate.e_score_correction_bias (E,): the aux-loss-free routing
               bias (DeepSeek-V3's name for it). Stock `Qwen2MoeForCausalLM` ignores it (an
               "unexpected key"), so its routing differs from ours: `bias_warning` says so.

transformers >= 5 fuses the experts in memory into `mlp.experts.gate_up_proj` (E, 2I, H) and
`mlp.experts.down_proj` (E, H, I) (its safetensors keep the per-expert keys);
`from_fused_state_dict` maps such an in-memory state dict to ours.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from megaqwen.models.config import ModelConfig
from megaqwen.models.qwen2 import hf_adapter as dense

HF_ARCHITECTURES = ["Qwen2MoeForCausalLM"]

CONFIG_KEYS = {
    **dense.CONFIG_KEYS,
    "num_experts": "num_experts",
    "num_experts_per_tok": "num_experts_per_tok",
    "moe_intermediate_size": "moe_intermediate_size",
    "shared_expert_intermediate_size": "shared_expert_intermediate_size",
    "norm_topk_prob": "norm_topk_prob",
    "decoder_sparse_step": "decoder_sparse_step",
    "mlp_only_layers": "mlp_only_layers",
    "router_aux_loss_coef": "router_aux_loss_coef",
}


# megaqwen-only config fields, written to config.json when non-zero (transformers keeps unknown keys)
EXTRA_CONFIG_KEYS = ("router_z_loss_coef", "moe_routing_bias_update_rate", "moe_capacity_factor")

BIAS_SUFFIX = ".mlp.gate.e_score_correction_bias"


def bias_warning(keys, hf_class: str = HF_ARCHITECTURES[0]) -> str | None:
    """The warning an HF export or import with routing-bias tensors must carry (None: none)."""
    n = sum(1 for k in keys if k.endswith(BIAS_SUFFIX))
    if not n:
        return None
    return (f"{n} aux-loss-free routing bias tensor(s) (*{BIAS_SUFFIX}) are kept in the HF folder; "
            f"stock transformers {hf_class} ignores them, so its top-k routing (and its "
            "outputs) differ from megaqwen's. Load the folder with megaqwen, or fold the bias into "
            "a routing-aware implementation")


def config_from_hf(hf: dict[str, Any], name: str = "hf") -> ModelConfig:
    dense.check_hf_config(hf, "qwen2_moe")
    return ModelConfig(name=name, arch="qwen2_moe", **moe_kwargs_from_hf(hf, CONFIG_KEYS))


def moe_kwargs_from_hf(hf: dict[str, Any], keys: dict[str, str]) -> dict[str, Any]:
    """ModelConfig kwargs of an MoE config.json: the dense ones, mlp_only_layers as a list, our
    extras (shared with Qwen3-MoE)."""
    kw = dense.config_kwargs_from_hf(hf, keys)
    kw["mlp_only_layers"] = list(kw.get("mlp_only_layers") or [])
    kw.update({k: float(hf[k]) for k in EXTRA_CONFIG_KEYS if k in hf})
    if "moe_balance" in hf:  # ours, written when not HF's form; absent: HF's micro-batch form
        kw["moe_balance"] = str(hf["moe_balance"])
    return kw


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    from transformers import Qwen2MoeConfig

    d = dense.hf_config_dict(cfg, dtype, Qwen2MoeConfig, CONFIG_KEYS, HF_ARCHITECTURES)
    return with_extras(cfg, d)


def with_extras(cfg: ModelConfig, d: dict[str, Any]) -> dict[str, Any]:
    """config.json dict `d` plus our non-zero extras (EXTRA_CONFIG_KEYS)."""
    d.update({k: getattr(cfg, k) for k in EXTRA_CONFIG_KEYS if getattr(cfg, k)})
    if cfg.moe_balance != "micro_batch":
        d["moe_balance"] = cfg.moe_balance
    return d


def hf_key(fqn: str) -> str:
    """HF safetensors key of our parameter `fqn`."""
    return fqn


def optional_hf_keys(cfg: ModelConfig) -> set[str]:
    return {"lm_head.weight"} if cfg.tie_word_embeddings else set()


_FUSED = re.compile(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def from_fused_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers-5 in-memory state dict (fused 3-D experts, `mlp.gate.weight` router) -> ours."""
    out = {}
    for k, v in sd.items():
        m = _FUSED.match(k)
        if m is None:
            out[k] = v
            continue
        pre, kind = m.groups()
        for e in range(v.shape[0]):
            if kind == "down_proj":
                out[f"{pre}.{e}.down_proj.weight"] = v[e]
            else:
                gate, up = v[e].chunk(2, dim=0)
                out[f"{pre}.{e}.gate_proj.weight"] = gate
                out[f"{pre}.{e}.up_proj.weight"] = up
    return out
