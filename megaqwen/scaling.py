"""Hyper-parameter scaling laws: the optimal peak learning rate and batch size as power laws.

The Qwen2.5 report fits the optimal lr and batch size as functions of model size N and data size D
without publishing the constants. Two forms here:

  deepseek (default)  DeepSeek LLM (2024), section 3.1, fitted on their data:
                        lr_opt = 0.3118 * C^-0.1250      B_opt = 0.2920 * C^0.3271 tokens
                      with C = M * D, M the non-embedding FLOPs per token (6 N_non-emb plus the
                      attention term; here `flops_per_token(seq)` minus the LM head's 6 V h)
  power               lr_opt = a * N^alpha * D^beta      B_opt = c * N^delta * D^gamma tokens
                      (N parameters without embeddings, D training tokens); constants from `fit`

`fit` reads a sweep CSV (columns N, D, lr, batch, loss; batch in tokens), keeps per (N, D) the run
of lowest loss, and solves log lr = log a + alpha log N + beta log D (and the batch twin) by least
squares; an exponent whose variable takes one value in the sweep is fixed at 0.

  megaqwen-plan scaling predict model=qwen2.5-7b tokens=18e12 [seq=4096] [form=power a=... ...]
  megaqwen-plan scaling fit sweep.csv [plot=fit.png]
"""

from __future__ import annotations

import csv
import math
import sys
from dataclasses import asdict, dataclass

import numpy as np

from megaqwen.models.config import ModelConfig, get_config


@dataclass
class PowerLaw:
    """lr = a N^alpha D^beta; batch (tokens) = c N^delta D^gamma."""

    a: float
    alpha: float
    beta: float
    c: float
    delta: float
    gamma: float

    def lr(self, n: float, d: float) -> float:
        return self.a * n**self.alpha * d**self.beta

    def batch_tokens(self, n: float, d: float) -> float:
        return self.c * n**self.delta * d**self.gamma


@dataclass
class ComputeLaw:
    """lr = a C^alpha; batch (tokens) = c C^gamma, C = non-embedding FLOPs per token x tokens."""

    a: float = 0.3118
    alpha: float = -0.1250
    c: float = 0.2920
    gamma: float = 0.3271

    def lr(self, compute: float) -> float:
        return self.a * compute**self.alpha

    def batch_tokens(self, compute: float) -> float:
        return self.c * compute**self.gamma


def non_embedding_flops_per_token(m: ModelConfig, seq: int) -> float:
    """DeepSeek's M: training FLOPs per token without the vocabulary (embedding and LM head)."""
    return m.flops_per_token(seq) - 6 * m.vocab_size * m.hidden_size


def predict(m: ModelConfig, tokens: float, seq: int, law: PowerLaw | ComputeLaw | None = None) -> dict:
    """Optimal peak lr and global batch (tokens, and sequences of `seq`) for training m on `tokens`."""
    if tokens <= 0 or seq <= 0:
        raise ValueError(f"tokens={tokens} and seq={seq} must be positive")
    law = law or ComputeLaw()
    if isinstance(law, ComputeLaw):
        c = non_embedding_flops_per_token(m, seq) * tokens
        lr, batch = law.lr(c), law.batch_tokens(c)
    else:
        n = m.active_params(include_embedding=False)
        c = 6 * n * tokens
        lr, batch = law.lr(n, tokens), law.batch_tokens(n, tokens)
    return {"compute": c, "lr": lr, "batch_tokens": batch, "batch_sequences": batch / seq}


def read_sweep(path: str) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"N", "D", "lr", "batch", "loss"}
    if not rows or not need <= set(rows[0]):
        raise ValueError(f"{path}: needs a header with columns {sorted(need)}, got "
                         f"{sorted(rows[0]) if rows else 'no rows'}")
    out = []
    for i, r in enumerate(rows, 2):
        try:
            v = {k: float(r[k]) for k in need}
        except ValueError as e:
            raise ValueError(f"{path} line {i}: {e}") from None
        if min(v["N"], v["D"], v["lr"], v["batch"]) <= 0:
            raise ValueError(f"{path} line {i}: N, D, lr and batch must be positive, got {v}")
        out.append(v)
    return out


def best_runs(rows: list[dict[str, float]]) -> list[dict[str, float]]:
    """Per (N, D): the run with the lowest loss."""
    best: dict[tuple[float, float], dict[str, float]] = {}
    for r in rows:
        k = (r["N"], r["D"])
        if k not in best or r["loss"] < best[k]["loss"]:
            best[k] = r
    return sorted(best.values(), key=lambda r: (r["N"], r["D"]))


def _fit_one(logn: np.ndarray, logd: np.ndarray, logy: np.ndarray) -> tuple[float, float, float]:
    cols, names = [np.ones_like(logn)], []
    for x, name in ((logn, "n"), (logd, "d")):
        if np.ptp(x) > 0:
            cols.append(x)
            names.append(name)
    coef, *_ = np.linalg.lstsq(np.stack(cols, 1), logy, rcond=None)
    got = dict(zip(names, coef[1:], strict=True))
    return math.exp(coef[0]), float(got.get("n", 0.0)), float(got.get("d", 0.0))


def fit(rows: list[dict[str, float]]) -> PowerLaw:
    """Least squares in log space over the best run of each (N, D)."""
    best = best_runs(rows)
    if len(best) < 2:
        raise ValueError(f"fit needs at least 2 distinct (N, D) pairs, got {len(best)}")
    logn = np.log([r["N"] for r in best])
    logd = np.log([r["D"] for r in best])
    a, alpha, beta = _fit_one(logn, logd, np.log([r["lr"] for r in best]))
    c, delta, gamma = _fit_one(logn, logd, np.log([r["batch"] for r in best]))
    return PowerLaw(a, alpha, beta, c, delta, gamma)


def plot(rows: list[dict[str, float]], law: PowerLaw, path: str) -> None:
    """Best lr and batch of each (N, D) against 6ND, with the fitted law's predictions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = best_runs(rows)
    comp = [6 * r["N"] * r["D"] for r in best]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, pred, label in ((axes[0], "lr", law.lr, "peak learning rate"),
                                 (axes[1], "batch", law.batch_tokens, "batch (tokens)")):
        ax.scatter(comp, [r[key] for r in best], label="best run per (N, D)")
        ax.scatter(comp, [pred(r["N"], r["D"]) for r in best], marker="x", label="fit")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("compute 6ND (FLOPs)")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"lr = {law.a:.3g} N^{law.alpha:.3f} D^{law.beta:.3f};  "
                 f"B = {law.c:.3g} N^{law.delta:.3f} D^{law.gamma:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _kv(args: list[str]) -> tuple[list[str], dict[str, str]]:
    pos, kv = [], {}
    for a in args:
        k, eq, v = a.partition("=")
        if eq:
            kv[k] = v
        else:
            pos.append(a)
    return pos, kv


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in ("predict", "fit"):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    pos, kv = _kv(argv[1:])
    try:
        if argv[0] == "predict":
            law: PowerLaw | ComputeLaw
            if kv.get("form", "deepseek") == "power":
                law = PowerLaw(**{k: float(kv[k]) for k in ("a", "alpha", "beta", "c", "delta", "gamma")})
            else:
                law = ComputeLaw(**{k: float(kv[k]) for k in ("a", "alpha", "c", "gamma") if k in kv})
            m = get_config(kv.get("model", "qwen2.5-7b"))
            seq = int(kv.get("seq", 4096))
            p = predict(m, float(kv.get("tokens", 18e12)), seq, law)
            print(f"{m.name} on {float(kv.get('tokens', 18e12)):.3g} tokens ({type(law).__name__} "
                  f"{asdict(law)}): compute {p['compute']:.3g} FLOPs, lr {p['lr']:.3g}, batch "
                  f"{p['batch_tokens']:.3g} tokens = {p['batch_sequences']:.0f} sequences of {seq}")
        else:
            if len(pos) != 1:
                raise ValueError("usage: megaqwen-plan scaling fit SWEEP.csv [plot=fit.png]")
            rows = read_sweep(pos[0])
            law = fit(rows)
            print(f"fit over {len(best_runs(rows))} (N, D) pairs: " +
                  ", ".join(f"{k}={v:.4g}" for k, v in asdict(law).items()))
            if "plot" in kv:
                plot(rows, law, kv["plot"])
                print(f"plot written to {kv['plot']}")
    except (ValueError, KeyError) as e:
        print(f"megaqwen-plan scaling: {e}", file=sys.stderr)
        return 2
    return 0
