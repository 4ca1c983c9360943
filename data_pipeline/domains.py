"""Domain classification: zero-shot by embedding similarity (default), the LLM judge, or distilled."""

from __future__ import annotations

import numpy as np


class ZeroShotDomains:
    """Cosine similarity between a document's embedding and each domain description's embedding."""

    def __init__(self, encoder, taxonomy: dict[str, str], min_similarity: float = 0.0):
        self.names = list(taxonomy)
        labels = [f"{name}: {desc}" for name, desc in taxonomy.items()]
        self.label_emb_CD = encoder.encode(labels)
        self.min_similarity = min_similarity

    def classify(self, doc_emb_ND: np.ndarray) -> list[tuple[str, float]]:
        sim_NC = doc_emb_ND @ self.label_emb_CD.T
        best = sim_NC.argmax(axis=1)
        out = []
        for i, j in enumerate(best):
            s = float(sim_NC[i, j])
            name = self.names[j] if s >= self.min_similarity or "other" not in self.names else "other"
            out.append((name, round(s, 4)))
        return out
