"""SwiGLU activation: silu(gate) * up.

Only the plain-PyTorch reference lives here for now.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
