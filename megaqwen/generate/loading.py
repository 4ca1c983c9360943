"""A whole model for generation from a run folder, a native checkpoint step folder or an HF folder."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> nn.Module:
    """Eval-mode model with kernels picked for `device` (`megaqwen.convert.hf.load_pretrained`:
    config.json -> HF folder, else a native checkpoint: step folder, checkpoints/ or run folder);
    Dual Chunk Attention when the config has it (KV-cache decoding: kernels/dca.py)."""
    from megaqwen.convert.hf import load_pretrained
    from megaqwen.kernels.registry import resolve_ops

    ops = resolve_ops(device=torch.device(device).type)
    return load_pretrained(path, ops=ops, device=device, dtype=dtype, dca=True).eval()  # DCA as configured
