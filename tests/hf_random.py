"""Random weights for transformers models in parity and conversion tests (shared by several folders)."""

from __future__ import annotations

import torch


def randomise_(model: torch.nn.Module, mlp_std: float = 0.2, std: float = 0.05) -> torch.nn.Module:
    """Every parameter random, in place: routers at 0.5 (a wide router spreads the routing), MLP and
    expert weights at `mlp_std`, the rest at `std`, norms near 1. With 0.05 everywhere the logits are
    ~0.1 and a wrong expert output hides below a 1e-4 tolerance."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.5 if name.endswith("mlp.gate.weight") else mlp_std if ".mlp." in name else std)
            if name.endswith("norm.weight"):
                p.add_(1.0)
    return model


def assert_logits_match(hf: torch.nn.Module, ours: torch.nn.Module, vocab_size: int,
                        atol: float = 1e-4) -> None:
    """Our model's logits equal transformers' (`.logits`) on the same random tokens (3 x 41, fp32)."""
    tokens = torch.randint(0, vocab_size, (3, 41), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
        got = ours(tokens)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= atol
