"""A reward model's starting point from a language model: `megaqwen-convert to-reward SRC OUT_DIR`.

Reward models start from a trained LM (usually the SFT model): the same body, the LM head dropped,
a new score head `score.weight` (1, H) drawn from Normal(0, init_std) (what transformers'
`AutoModelForSequenceClassification.from_pretrained(lm)` does to the missing head). The result is a
native checkpoint of the `head=score` config (untied) that `train.init_from` starts a
`train.objective=reward` run from.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from megaqwen.convert.hf import write_native
from megaqwen.models.weights import read_weights


def to_reward(src: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """LM checkpoint (HF folder or native) -> reward-model checkpoint folder (step 0)."""
    cfg, weights = read_weights(src)
    if cfg.head != "lm":
        raise ValueError(f"{src}: already a head={cfg.head} model (to-reward takes a language model)")
    embed = weights["model.embed_tokens.weight"]
    weights.pop("lm_head.weight", None)
    g = torch.Generator().manual_seed(seed)
    score = torch.randn(1, cfg.hidden_size, generator=g, dtype=torch.float32) * cfg.init_std
    weights["score.weight"] = score.to(embed.dtype)
    reward_cfg = replace(cfg, head="score", tie_word_embeddings=False)
    return write_native(reward_cfg, weights, Path(out_dir), Path(src))
