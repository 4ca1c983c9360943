"""Quality scores and domain labels from option-token probabilities.

The score of a document on a dimension is the expectation of the digit the judge would answer,
over the next-token distribution restricted to the score tokens:

    p_k = P(first answer token = "k" | prompt),  k = 0..5
    score = sum_k k * p_k / sum_k p_k

`mass = sum_k p_k` (how much of the distribution the judge put on valid answers) is kept too; a
judge that follows the instruction has mass close to 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megaqwen.data_pipeline.judge.rubric import (
    SCORE_TOKENS,
    check_dimensions,
    domain_letters,
    domain_messages,
    quality_messages,
)


def option_probs(logprobs_NK: np.ndarray) -> np.ndarray:
    """Option probabilities renormalised over the K options (N, K); NaN rows where no option has mass."""
    lp = np.asarray(logprobs_NK, dtype=np.float64)
    m = np.max(lp, axis=1, keepdims=True)
    p = np.exp(lp - np.where(np.isfinite(m), m, 0.0))  # rescaled: all-tiny probabilities do not give 0/0
    z = p.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(z > 0, p / z, np.nan)


def expected_scores(logprobs_NK: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(expected score (N,), probability mass on the score tokens (N,)) from option log-probs (N, K)."""
    lp = np.asarray(logprobs_NK, dtype=np.float64)
    score = option_probs(lp) @ np.arange(lp.shape[1], dtype=np.float64)
    return score, np.exp(lp).sum(axis=1)


@dataclass
class Judgement:
    scores: dict[str, float]  # dimension -> expected score in [0, 5]; "overall" is their mean
    mass: dict[str, float]  # dimension -> probability on the score tokens


class Judge:
    def __init__(self, backend, dimensions: list[str], max_doc_chars: int = 6000):
        check_dimensions(dimensions)
        self.backend, self.dimensions, self.max_doc_chars = backend, dimensions, max_doc_chars

    def score(self, texts: list[str]) -> list[Judgement]:
        chats = [quality_messages(t, d, self.max_doc_chars) for t in texts for d in self.dimensions]
        lp = self.backend.option_logprobs(chats, SCORE_TOKENS)
        score, mass = expected_scores(lp)
        nd = len(self.dimensions)
        out = []
        for i in range(len(texts)):
            s = {d: float(score[i * nd + j]) for j, d in enumerate(self.dimensions)}
            s["overall"] = float(np.mean(list(s.values())))
            out.append(Judgement(s, {d: float(mass[i * nd + j]) for j, d in enumerate(self.dimensions)}))
        return out

    def domains(self, texts: list[str], taxonomy: dict[str, str]) -> list[dict[str, float]]:
        """Per document, domain -> probability (renormalised over the option letters)."""
        letters = domain_letters(len(taxonomy))
        lp = self.backend.option_logprobs(
            [domain_messages(t, taxonomy, self.max_doc_chars) for t in texts], letters
        )
        return [dict(zip(taxonomy, map(float, row))) for row in option_probs(lp)]


def build_backend(cfg):
    """A backend for a `JudgeConfig`."""
    from megaqwen.data_pipeline.judge.backends import LocalBackend, OpenAIBackend, load_chat_tokenizer

    if cfg.backend == "local":
        return LocalBackend(
            cfg.model,
            tokenizer=load_chat_tokenizer(cfg.tokenizer, cfg.model),
            device=cfg.device,
            dtype=cfg.dtype,
            batch_size=cfg.batch_size,
        )
    if cfg.backend == "openai":
        tok = load_chat_tokenizer(cfg.tokenizer, None) if cfg.mode == "echo" else None
        return OpenAIBackend(
            cfg.base_url,
            cfg.model,
            cfg.mode,
            cfg.top_logprobs,
            tok,
            cfg.batch_size,
            cfg.timeout_s,
            cfg.api_key_env,
        )
    raise ValueError(f"judge.backend {cfg.backend!r} has no backend")
