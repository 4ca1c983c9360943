"""The distilled heads learn what they are shown; agreement metrics are computed correctly."""

from __future__ import annotations

import numpy as np
import pytest

from megaqwen.data_pipeline.scorer import RidgeScorer, SoftmaxClassifier, agreement, split_indices


def test_ridge_recovers_linear_labels_and_agreement(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16))
    w = rng.normal(size=(16, 2)) * 0.3
    y = np.clip(x @ w + 2.5, 0, 5)
    tr, ho = split_indices(300, 0.2, seed=0)
    assert len(ho) == 60 and not set(tr) & set(ho)
    model = RidgeScorer.fit(x[tr], y[tr], ["a", "b"], alpha=1e-3)
    m = agreement(model.predict(x[ho]), y[ho], ["a", "b"])
    assert m["a"]["pearson"] > 0.99 and m["b"]["mae"] < 0.05
    model.save(tmp_path / "q.npz")
    np.testing.assert_allclose(RidgeScorer.load(tmp_path / "q.npz").predict(x[:5]), model.predict(x[:5]))


def test_agreement_known_values():
    pred = np.array([[1.0], [2.0], [3.0], [4.0]])
    true = np.array([[1.0], [2.0], [3.5], [3.0]])
    m = agreement(pred, true, ["d"])["d"]
    assert m["mae"] == pytest.approx(0.375) and m["within_0.5"] == pytest.approx(0.75)
    assert m["spearman"] == pytest.approx(0.8)


def test_softmax_classifier_separates_clusters():
    rng = np.random.default_rng(1)
    centres = np.eye(3) * 4
    y = np.repeat([0, 1, 2], 40)
    x = centres[y] + rng.normal(size=(120, 3))
    clf = SoftmaxClassifier.fit(x, y, ["a", "b", "c"])
    assert (clf.predict_proba(x).argmax(1) == y).mean() > 0.95
