"""Distilled scorers: cheap heads on sentence embeddings, trained on the judge's labels.

Quality: one ridge regression per dimension (closed form). Domain: multinomial logistic regression
(L-BFGS in torch). Both are a few kB, run at encoder speed, and are saved as .npz.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


def _with_bias(x_ND: np.ndarray) -> np.ndarray:
    return np.hstack([x_ND, np.ones((len(x_ND), 1), x_ND.dtype)])


@dataclass
class RidgeScorer:
    dims: list[str]
    w_DK: np.ndarray  # (D + 1, K): last row is the bias

    @classmethod
    def fit(cls, x_ND: np.ndarray, y_NK: np.ndarray, dims: list[str], alpha: float) -> RidgeScorer:
        x = _with_bias(x_ND.astype(np.float64))
        reg = alpha * np.eye(x.shape[1])
        reg[-1, -1] = 0.0  # do not shrink the bias
        w = np.linalg.solve(x.T @ x + reg, x.T @ y_NK.astype(np.float64))
        return cls(list(dims), w)

    def predict(self, x_ND: np.ndarray) -> np.ndarray:  # (N, K) clipped to the rubric's range
        return np.clip(_with_bias(x_ND.astype(np.float64)) @ self.w_DK, 0.0, 5.0)

    def save(self, path: Path) -> None:
        np.savez(path, w=self.w_DK, dims=np.array(self.dims))

    @classmethod
    def load(cls, path: Path) -> RidgeScorer:
        z = np.load(path)
        return cls([str(d) for d in z["dims"]], z["w"])


@dataclass
class SoftmaxClassifier:
    labels: list[str]
    w_DC: np.ndarray  # (D + 1, C)

    @classmethod
    def fit(cls, x_ND: np.ndarray, y_N: np.ndarray, labels: list[str], l2: float = 1e-3) -> SoftmaxClassifier:
        import torch

        x = torch.tensor(_with_bias(x_ND.astype(np.float64)))
        y = torch.tensor(y_N, dtype=torch.long)
        w = torch.zeros(x.shape[1], len(labels), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(x @ w, y) + l2 * (w[:-1] ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return cls(list(labels), w.detach().numpy())

    def predict_proba(self, x_ND: np.ndarray) -> np.ndarray:
        z = _with_bias(x_ND.astype(np.float64)) @ self.w_DC
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)

    def save(self, path: Path) -> None:
        np.savez(path, w=self.w_DC, labels=np.array(self.labels))

    @classmethod
    def load(cls, path: Path) -> SoftmaxClassifier:
        z = np.load(path)
        return cls([str(d) for d in z["labels"]], z["w"])


def _ranks(a: np.ndarray) -> np.ndarray:
    r = np.empty(len(a))
    r[np.argsort(a, kind="stable")] = np.arange(len(a))
    return r


def agreement(pred_NK: np.ndarray, true_NK: np.ndarray, dims: list[str]) -> dict[str, dict[str, float]]:
    """Per dimension: Pearson r, Spearman rho, mean absolute error, share within 0.5 points."""
    out = {}
    for j, d in enumerate(dims):
        p, t = pred_NK[:, j], true_NK[:, j]
        ok = np.std(p) > 0 and np.std(t) > 0
        out[d] = {
            "pearson": float(np.corrcoef(p, t)[0, 1]) if ok else float("nan"),
            "spearman": float(np.corrcoef(_ranks(p), _ranks(t))[0, 1]) if ok else float("nan"),
            "mae": float(np.mean(np.abs(p - t))),
            "within_0.5": float(np.mean(np.abs(p - t) <= 0.5)),
            "n": len(p),
        }
    return out


def split_indices(n: int, heldout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) index arrays; at least one document in each when n >= 2."""
    perm = np.random.default_rng(seed).permutation(n)
    k = min(max(int(round(n * heldout_fraction)), 1), n - 1) if n >= 2 else 0
    return np.sort(perm[k:]), np.sort(perm[:k])
