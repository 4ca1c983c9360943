"""Hugging Face <-> megaqwen checkpoint conversion.

Parameter names are identical (the model uses HF's names), so the weights map one to one; the only
non-identity parts are the config keys (below) and the tied LM head, which HF's safetensors omit.
Tensors keep their stored dtype in both directions, so HF -> megaqwen -> HF is bit-exact.
The architecture comes from config.json's `model_type` (qwen2 | qwen2_moe | qwen3 | qwen3_moe) on
import and from the checkpoint's ModelConfig.arch on export; each model spec's HF adapter maps its
config. The MoE aux-free routing bias travels as an extra tensor, with a warning (see
qwen2_moe/hf_adapter.py).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

from megaqwen.models.config import ModelConfig
from megaqwen.models.qwen2.hf_adapter import CONFIG_KEYS, config_from_hf, config_to_hf  # noqa: F401
from megaqwen.models.weights import (
    MODEL_TYPES,  # noqa: F401  (re-exported: where callers of the converter found it)
    hf_adapter,
    read_hf,
    read_model_weights,
    read_weights,
    warn_extras,
)
from megaqwen.parallel.checkpoint_folder import FORMAT

log = logging.getLogger(__name__)


def expected_keys(cfg: ModelConfig) -> set[str]:
    from megaqwen.models.spec import get_spec

    return set(get_spec(cfg).build(cfg, device="meta").state_dict())


def from_hf(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """HF Qwen2 folder -> megaqwen checkpoint folder (DCP + meta.json, step 0)."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    cfg, weights = read_hf(hf_dir)
    want = expected_keys(cfg)
    missing, extra = want - set(weights), set(weights) - want
    if missing or extra:
        raise ValueError(f"{hf_dir}: weights do not match the config: missing {sorted(missing)[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {sorted(extra)[:5]}")
    return write_native(cfg, weights, out_dir, source=hf_dir)


def write_native(cfg: ModelConfig, weights: dict[str, torch.Tensor], out_dir: Path, source: Path) -> Path:
    """A megaqwen checkpoint folder (DCP + meta.json, step 0) holding `weights` whole."""
    weights = {k: v.contiguous() for k, v in weights.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    dcp.save({"model": weights}, checkpoint_id=str(out_dir))
    meta = {"format": FORMAT, "step": 0, "consumed_samples": 0, "model_config": cfg.to_dict(),
            "source": str(source)}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    log.info("wrote megaqwen checkpoint %s (%d tensors)", out_dir, len(weights))
    return out_dir


def load_pretrained(path: str | Path, ops=None, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, dca: bool = False):
    """A model from a native checkpoint folder or an HF folder (config.json + safetensors). `dca`: a
    config with Dual Chunk Attention (HF dual_chunk_attention_config) builds with its ops, as vLLM
    serves it (inference: generation, evaluation)."""
    from megaqwen.kernels.dca import dca_config_of, dca_ops
    from megaqwen.kernels.registry import KernelOps
    from megaqwen.models.spec import get_spec

    cfg, weights = read_weights(path)
    if dca and cfg.dca_chunk_size:
        ops = dca_ops(ops or KernelOps(), dca_config_of(cfg))
    model = get_spec(cfg).build(cfg, ops, device=device, dtype=dtype)
    model.load_state_dict(weights, strict=True)  # copies and casts into the model's dtype
    return model


def to_hf(ckpt_dir: str | Path, hf_dir: str | Path, max_shard_bytes: int = 5 * 2**30,
          tokenizer: bool = True) -> Path:
    """megaqwen checkpoint -> HF folder (config.json, generation_config.json, safetensors shards,
    tokenizer files), every file with the same permissions."""
    cfg, state = read_model_weights(ckpt_dir)
    hf_dir = Path(hf_dir)
    hf_dir.mkdir(parents=True, exist_ok=True)
    dtype = next(iter(state.values())).dtype
    adapter = hf_adapter(cfg.arch)
    hf_config = adapter.config_to_hf(cfg, dtype)
    warn_extras(state, adapter)
    (hf_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
    write_generation_config(hf_dir, hf_config)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(state):
        nbytes = state[k].numel() * state[k].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = state[k].contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], hf_dir / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, hf_dir / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if tokenizer:
        from megaqwen.tokenizer import load_tokenizer

        load_tokenizer().save_pretrained(str(hf_dir))
    uniform_file_modes(hf_dir)
    log.info("wrote HF checkpoint %s (%d tensors, %d file(s))", hf_dir, len(state), len(shards))
    return hf_dir


def write_generation_config(hf_dir: Path, hf_config: dict[str, Any]) -> None:
    """generation_config.json as the Qwen2.5 base models ship it: greedy, stop at <|endoftext|>."""
    from transformers import GenerationConfig

    GenerationConfig(bos_token_id=hf_config["bos_token_id"], eos_token_id=hf_config["eos_token_id"],
                     do_sample=False, max_new_tokens=2048).save_pretrained(str(hf_dir))


def uniform_file_modes(folder: Path) -> None:
    """Give every file the mode a plain open() would (0644 under the usual umask 022): safetensors
    writes its files 0600, which breaks sharing the export with other users."""
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)
