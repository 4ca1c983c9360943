"""How the Qwen2 family (Qwen2, Qwen2-MoE, Qwen3, Qwen3-MoE) splits into pipeline stages: the
spec's `pipeline` (see `megaqwen.models.spec.PipelineSplit`).

A stage keeps the full module tree minus what it does not run, so parameter names never change:
its decoder layers; the input embedding on the first stage; the final norm and the LM head (a reward
model's score head) on the last. With tied embeddings the last stage keeps `model.embed_tokens` as
its head (the pipeline sums the two copies' gradients over the embedding group: `shared_params`).
"""

from __future__ import annotations

import torch.nn as nn


class Qwen2Stages:
    """The Qwen2 family's `PipelineSplit`."""

    @staticmethod
    def prune(model: nn.Module, keep_layers: set[int], first: bool, last: bool) -> None:
        layers = model.model.layers
        for name in [n for n in layers if int(n) not in keep_layers]:
            del layers[name]
        if not first and not (last and model.cfg.tie_word_embeddings):
            model.model.embed_tokens = None
        if not last:
            model.model.norm = None
            model.lm_head = None
            model.score = None

    @staticmethod
    def boundary_modules(model: nn.Module, first: bool, last: bool) -> dict[str, nn.Module]:
        """The modules besides its layers that a chunk runs: the embedding (first), the final norm
        and the head (last; the embedding when tied). Keys are local names (not saved)."""
        out: dict[str, nn.Module] = {}
        if first:
            out["embed"] = model.model.embed_tokens
        if last:
            out["norm"] = model.model.norm
            out["head"] = next(m for m in (model.score, model.lm_head, model.model.embed_tokens)
                               if m is not None)
        return out

    @staticmethod
    def shared_params(model: nn.Module) -> list[str]:
        """Parameters the first and the last stage both hold (a tied embedding)."""
        return ["model.embed_tokens.weight"] if model.cfg.tie_word_embeddings else []
