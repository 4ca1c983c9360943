"""Hugging Face adapter of the Qwen2 spec: config keys and parameter names.

Parameter names are HF's own (the model was written with them), so `hf_key` is the identity; the
non-identity parts are the config keys below and the tied LM head, which HF's safetensors may omit
(or carry as a copy that loading ignores).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from megaqwen.models.config import ModelConfig

log = logging.getLogger(__name__)

HF_ARCHITECTURES = ["Qwen2ForCausalLM"]

# megaqwen ModelConfig field -> HF Qwen2Config key
CONFIG_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "rope_theta": "rope_theta",
    "rms_norm_eps": "rms_norm_eps",
    "max_position_embeddings": "max_position_embeddings",
    "tie_word_embeddings": "tie_word_embeddings",
    "init_std": "initializer_range",
}


def config_from_hf(hf: dict[str, Any], name: str = "hf") -> ModelConfig:
    check_hf_config(hf, "qwen2")
    return ModelConfig(name=name, **config_kwargs_from_hf(hf, CONFIG_KEYS))


def check_hf_config(hf: dict[str, Any], model_type: str) -> None:
    """Refuse what no adapter of the family maps: another model_type, a non-SiLU MLP, sliding
    windows (no published Qwen2.5 / Qwen3 checkpoint uses them)."""
    if hf.get("model_type") != model_type:
        raise ValueError(f"model_type {hf.get('model_type')!r} is not {model_type!r}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported ({model_type} uses silu)")
    if hf.get("use_sliding_window"):
        raise ValueError("use_sliding_window=true is not supported (no published checkpoint uses it)")


# published config.json key -> the name transformers >= 5 writes it under (Qwen3MoeConfig's
# attribute_map): read either, write the published one (transformers 4.x reads only that)
HF_KEY_ALIASES = {"num_experts": "num_local_experts"}


def config_kwargs_from_hf(hf: dict[str, Any], keys: dict[str, str]) -> dict[str, Any]:
    """ModelConfig kwargs from an HF config dict through `keys` (ours -> theirs), with RoPE base and
    head_dim read the way every transformers version writes them (shared by the Qwen2 family)."""
    rope_theta = hf.get("rope_theta")
    if rope_theta is None:  # transformers >= 5 nests it under rope_parameters
        rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", 10_000.0)
    hf = {**{k: hf[a] for k, a in HF_KEY_ALIASES.items() if a in hf}, **hf}
    kw = {ours: hf[theirs] for ours, theirs in keys.items() if theirs in hf}
    kw["rope_theta"] = float(rope_theta)
    kw.update(head_from_hf(hf))
    kw.update(rope_scaling_from_hf(hf))
    kw.update(dca_from_hf(hf))
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim != hf["hidden_size"] // hf["num_attention_heads"]:
        kw["head_dim"] = head_dim
    return kw


SEQ_CLS = "ForSequenceClassification"
"""Suffix of the HF class a score-head model (a reward model) exports as: `Qwen2ForSequenceClassification`
(`model.*` + `score.weight` (1, H), num_labels=1) and its Qwen3 / MoE siblings."""
def head_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig kwargs of the head: a `*ForSequenceClassification` with one label is a score head
    (untied: it has no LM head; its pad id kept); more labels are refused (a reward model has one)."""
    if not any(a.endswith(SEQ_CLS) for a in hf.get("architectures") or []):
        return {}
    labels = hf.get("num_labels", len(hf.get("id2label") or {0: ""}))
    if labels != 1:
        raise ValueError(f"a sequence classifier with num_labels={labels} is not supported (a reward "
                         "model's score head has 1)")
    pad = {"pad_token_id": hf["pad_token_id"]} if hf.get("pad_token_id") is not None else {}
    return {"head": "score", "tie_word_embeddings": False, **pad}


def head_to_hf(cfg: ModelConfig, architectures: list[str]) -> tuple[list[str], dict[str, Any]]:
    """(architectures, extra config keys) of `cfg`'s head: a score head exports as the family's
    sequence classifier with one label and the pad id it finds each row's last token by."""
    if cfg.head != "score":
        return architectures, {}
    return ([a.replace("ForCausalLM", SEQ_CLS) for a in architectures],
            {"num_labels": 1, "pad_token_id": cfg.pad_token_id})


# HF yarn key -> ModelConfig field; any other key in a yarn rope_scaling is refused, not ignored
YARN_KEYS = {"factor": "rope_scaling_factor", "original_max_position_embeddings":
             "rope_original_max_position", "beta_fast": "rope_beta_fast",
             "beta_slow": "rope_beta_slow", "attention_factor": "rope_attention_factor"}
_YARN_NEUTRAL = {"type", "rope_type", "rope_theta", "truncate"}


def rope_scaling_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig RoPE-scaling kwargs from `rope_scaling` (transformers < 5) or `rope_parameters`
    (>= 5), the type under "type" or "rope_type". Types other than default and yarn, and yarn
    options we do not implement (mscale, truncate=false), are a ValueError."""
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return {}
    if kind != "yarn":
        raise ValueError(f"rope_scaling type {kind!r} is not supported (megaqwen implements default "
                         "RoPE and yarn); convert the checkpoint with rope_scaling removed or yarn")
    unknown = sorted(set(params) - set(YARN_KEYS) - _YARN_NEUTRAL)
    if unknown or params.get("truncate", True) is not True:
        raise ValueError(f"yarn rope_scaling keys {unknown or ['truncate=false']} are not supported "
                         f"(megaqwen's yarn takes {sorted(YARN_KEYS)})")
    kw = {ours: params[theirs] for theirs, ours in YARN_KEYS.items() if params.get(theirs) is not None}
    kw.setdefault("rope_original_max_position", hf["max_position_embeddings"])  # HF's default
    return {"rope_scaling": "yarn", **kw}


def rope_scaling_to_hf(cfg: ModelConfig) -> dict[str, Any] | None:
    """HF `rope_scaling` of `cfg`, with both "type" (transformers < 4.45, vLLM) and "rope_type"."""
    if cfg.rope_scaling == "none":
        return None
    d = {"type": "yarn", "rope_type": "yarn", "factor": cfg.rope_scaling_factor,
         "original_max_position_embeddings": cfg.rope_original_max_position,
         "beta_fast": cfg.rope_beta_fast, "beta_slow": cfg.rope_beta_slow}
    if cfg.rope_attention_factor:
        d["attention_factor"] = cfg.rope_attention_factor
    return d


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    from transformers import Qwen2Config

    return hf_config_dict(cfg, dtype, Qwen2Config, CONFIG_KEYS, HF_ARCHITECTURES)


def hf_config_dict(cfg: ModelConfig, dtype: torch.dtype, config_cls: type, keys: dict[str, str],
                   architectures: list[str], **extra: Any) -> dict[str, Any]:
    """config.json contents for `cfg` through a transformers config class (shared by the family);
    `extra` are further keys of that class (Qwen3: head_dim, attention_bias)."""
    architectures, head = head_to_hf(cfg, architectures)
    kw = {theirs: getattr(cfg, ours) for ours, theirs in keys.items()} | extra | head
    hf = config_cls(**kw, hidden_act="silu", use_sliding_window=False, bos_token_id=151643,
                    eos_token_id=151643, architectures=architectures)
    d = hf.to_dict()
    for key, alias in HF_KEY_ALIASES.items():
        if key in keys.values() and alias in d:
            d[key] = d.pop(alias)
    d["torch_dtype"] = str(dtype).removeprefix("torch.")
    d["rope_theta"] = cfg.rope_theta  # keep the flat key older transformers read
    scaling = rope_scaling_to_hf(cfg)
    if scaling:  # both spellings: transformers >= 5 reads rope_parameters, the rest rope_scaling
        d["rope_scaling"] = scaling
        d["rope_parameters"] = {**(d.get("rope_parameters") or {}), **scaling,
                                "rope_theta": cfg.rope_theta}
    dca = dca_to_hf(cfg)
    if dca:
        d["dual_chunk_attention_config"] = dca
    return d


# vLLM's sparse-attention keys of a DCA config (Qwen2.5-1M ships them): read with a warning, since
# megaqwen runs dense DCA; vLLM switches sparse attention on above sparse_attention_threshold tokens
_DCA_SPARSE = ("sparse_attention_config", "sparse_attention_enabled", "sparse_attention_threshold",
               "sparse_attention_last_q")


def dca_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig DCA kwargs from `dual_chunk_attention_config` as vLLM reads it: chunk_size (vLLM's
    default 8192), local_size (1024), original_max_position_embeddings (0: no length temperature).
    vLLM ignores rope_scaling next to it; the model does too under DCA (see kernels/dca.py)."""
    dca = hf.get("dual_chunk_attention_config")
    if not dca:
        return {}
    unknown = sorted(set(dca) - {"chunk_size", "local_size", "original_max_position_embeddings",
                                  *_DCA_SPARSE})
    if unknown:
        raise ValueError(f"dual_chunk_attention_config keys {unknown} are not supported (megaqwen reads "
                         "chunk_size, local_size, original_max_position_embeddings)")
    sparse = [k for k in _DCA_SPARSE if k in dca]
    if sparse:
        log.warning("dual_chunk_attention_config: %s not implemented (megaqwen runs dense DCA; vLLM uses "
                    "sparse attention above sparse_attention_threshold tokens); dropped", sparse)
    return {"dca_chunk_size": int(dca.get("chunk_size", 8192)),
            "dca_local_size": int(dca.get("local_size", 1024)),
            "dca_original_max_position": int(dca.get("original_max_position_embeddings", 0))}


def dca_to_hf(cfg: ModelConfig) -> dict[str, Any] | None:
    """`dual_chunk_attention_config` of `cfg` (None without DCA): vLLM then runs the same DCA as our
    eval (positions, and the length temperature when dca_original_max_position > 0)."""
    if not cfg.dca_chunk_size:
        return None
    if cfg.dca_variant != "vllm":
        raise ValueError(f"dca_variant={cfg.dca_variant!r} has no HF/vLLM spelling (vLLM runs the vllm "
                         "variant); export with dca_variant=vllm")
    d = {"chunk_size": cfg.dca_chunk_size, "local_size": cfg.dca_local_size}
    if cfg.dca_original_max_position:
        d["original_max_position_embeddings"] = cfg.dca_original_max_position
    return d


def hf_key(fqn: str) -> str:
    """HF safetensors key of our parameter `fqn`."""
    return fqn


def optional_hf_keys(cfg: ModelConfig) -> set[str]:
    """Keys an HF checkpoint may carry that the model does not (a tied head's copy)."""
    return {"lm_head.weight"} if cfg.tie_word_embeddings else set()
