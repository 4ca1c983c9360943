"""Scaling laws: DeepSeek LLM's published constants, and the fit recovering known constants."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from megaqwen.models.config import get_config
from megaqwen.plan.cli import main
from megaqwen.scaling import ComputeLaw, PowerLaw, fit, predict, read_sweep

TRUE = PowerLaw(a=2.0, alpha=-0.25, beta=-0.05, c=0.5, delta=0.1, gamma=0.3)


def _sweep(law: PowerLaw, noise: float = 0.0, seed: int = 0) -> list[dict[str, float]]:
    """Per (N, D), a 5 x 5 grid of lr and batch at factors 2^k around the law's optimum (jittered by
    `noise` in log space), loss a bowl in log lr and log batch around the true optimum."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in (1e7, 3e7, 1e8, 3e8, 1e9):
        for d in (1e9, 4e9, 2e10):
            lr0 = law.lr(n, d) * math.exp(noise * rng.standard_normal())
            b0 = law.batch_tokens(n, d) * math.exp(noise * rng.standard_normal())
            for i in range(-2, 3):
                for j in range(-2, 3):
                    loss = 3.0 + 0.05 * (i * i + 0.5 * j * j)
                    rows.append(dict(N=n, D=d, lr=lr0 * 2.0**i, batch=b0 * 2.0**j, loss=loss))
    return rows


def test_fit_recovers_known_constants():
    got = fit(_sweep(TRUE))
    for k in ("alpha", "beta", "delta", "gamma"):
        assert getattr(got, k) == pytest.approx(getattr(TRUE, k), abs=1e-9), k
    assert got.a == pytest.approx(TRUE.a, rel=1e-9) and got.c == pytest.approx(TRUE.c, rel=1e-9)
    noisy = fit(_sweep(TRUE, noise=0.05, seed=1))  # 5% jitter of each optimum
    for k in ("alpha", "beta", "delta", "gamma"):
        assert getattr(noisy, k) == pytest.approx(getattr(TRUE, k), abs=0.03), k
    one_d = fit([r for r in _sweep(TRUE) if r["D"] == 1e9])  # D fixed: its exponent is 0
    assert one_d.beta == 0 and one_d.alpha == pytest.approx(TRUE.alpha)
    with pytest.raises(ValueError, match="at least 2 distinct"):
        fit([r for r in _sweep(TRUE) if r["N"] == 1e7 and r["D"] == 1e9])


def test_deepseek_defaults_and_prediction():
    law = ComputeLaw()
    assert law.lr(1e20) == pytest.approx(0.3118 * 10**-2.5)
    assert law.batch_tokens(1e20) == pytest.approx(0.2920 * 10**(20 * 0.3271))
    m = get_config("qwen2.5-7b")
    p = predict(m, 18e12, 4096)
    assert 1e23 < p["compute"] < 1e25 and 1e-4 < p["lr"] < 1e-3 and 1e6 < p["batch_tokens"] < 1e8
    assert p["batch_sequences"] == pytest.approx(p["batch_tokens"] / 4096)
    small = predict(get_config("qwen2.5-0.5b"), 1e12, 4096)
    assert small["lr"] > p["lr"] and small["batch_tokens"] < p["batch_tokens"]
    q = predict(m, 1e12, 4096, TRUE)
    assert q["lr"] == pytest.approx(TRUE.lr(m.active_params(include_embedding=False), 1e12))


def test_cli_fit_writes_plot_and_predict(tmp_path, capsys):
    path = tmp_path / "sweep.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["N", "D", "lr", "batch", "loss"])
        w.writeheader()
        w.writerows(_sweep(TRUE))
    assert len(read_sweep(str(path))) == 15 * 25
    png = tmp_path / "fit.png"
    assert main(["scaling", "fit", str(path), f"plot={png}"]) == 0
    out = capsys.readouterr().out
    assert "alpha=-0.25" in out and png.stat().st_size > 1000
    assert main(["scaling", "predict", "model=qwen2.5-72b", "tokens=18e12"]) == 0
    assert "lr" in capsys.readouterr().out
    bad = tmp_path / "bad.csv"
    bad.write_text("N,D,lr\n1,2,3\n")
    assert main(["scaling", "fit", str(bad)]) == 2 and "columns" in capsys.readouterr().err
