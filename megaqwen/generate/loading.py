"""A whole model for generation from a run folder, a native checkpoint step folder or an HF folder.

Built from `megaqwen.models.weights.read_weights` and the spec (what `megaqwen.convert.hf.
load_pretrained` does too): generate may not import convert, which imports the trainer, which
imports generate (tests/test_import_graph.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> nn.Module:
    """Eval-mode model with kernels picked for `device` (config.json -> HF folder, else a native
    checkpoint: step folder, checkpoints/ or run folder); Dual Chunk Attention when the config has
    it, as vLLM serves dual_chunk_attention_config (KV-cache decoding: kernels/dca.py)."""
    from megaqwen.kernels.dca import dca_config_of, dca_ops
    from megaqwen.kernels.registry import resolve_ops
    from megaqwen.models.spec import get_spec
    from megaqwen.models.weights import read_weights

    cfg, weights = read_weights(path)
    ops = resolve_ops(device=torch.device(device).type)
    if cfg.dca_chunk_size:
        ops = dca_ops(ops, dca_config_of(cfg))
    model = get_spec(cfg).build(cfg, ops, device=device, dtype=dtype)
    model.load_state_dict(weights, strict=True)  # copies and casts into the model's dtype
    return model.eval()
