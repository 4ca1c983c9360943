"""The shipped config on the labelled multi-domain corpus meets the issue's bars (filter + dedup)."""

from __future__ import annotations

import json
from pathlib import Path

from megaqwen.data_pipeline.config import load_config, resolve_config_path
from megaqwen.data_pipeline.samples.evaluate_corpus import CORPUS, evaluate
from megaqwen.data_pipeline.samples.make_eval_corpus import make_records
from megaqwen.data_pipeline.stages import scorer_warnings


def test_eval_corpus_is_reproducible_and_small():
    recs = make_records(0)
    assert CORPUS.read_text(encoding="utf-8") == "".join(
        json.dumps(r, ensure_ascii=False) + "\n" for r in recs
    )
    assert CORPUS.stat().st_size < 1_000_000
    assert {r["label"]["lang"] for r in recs if r["label"]["content"] == "prose"} >= {
        "en",
        "de",
        "es",
        "fr",
        "ru",
        "zh",
        "ja",
    }


def test_sample_config_on_the_labelled_corpus(tmp_path: Path):
    cfg = load_config("sample", {"output_dir": str(tmp_path / "out"), "workers": 1})
    cfg.input.parts_per_file = 2
    r = evaluate(cfg, CORPUS)
    loss = r["clean_loss"]
    for k in ("code", "math", "prose:de", "prose:es", "prose:fr", "prose:ru", "prose:zh", "prose:ja"):
        assert loss[k]["rate"] <= 0.05, (k, loss[k], r["clean_loss_reasons"].get(k))
    assert r["code_integrity"]["changed_beyond_documented"] == 0, r["code_integrity"]
    assert r["junk_recall"]["rate"] >= 0.9, r["junk_recall"]
    for kind in ("email", "phone", "ip"):
        assert r["pii_recall"][kind]["rate"] >= 0.95, (kind, r["pii_recall"], r["pii_missed"])
    assert r["clean_altered_by_pii"]["rate"] <= 0.01, r["clean_altered_by_pii"]
    assert r["content_type"]["code"]["rate"] >= 0.9, r["content_type"]["code"]
    assert all(v["resolved"] == v["of"] for v in r["duplicate_recall"].values()), r["duplicate_recall"]


def test_configs_load_by_name_from_anywhere(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("sample")
    assert Path(cfg.input.paths[0]).is_file()  # the shipped corpus, found beside the config
    assert resolve_config_path("pipeline_sample") == resolve_config_path("sample")
    assert load_config("cluster").executor.kind == "local"


def test_scorer_warnings_flag_a_flat_judge_and_no_gain_over_the_mean():
    flat = {
        "judge_score_std": {"q": 0.003},
        "quality": {"q": {"mae": 0.01}},
        "baseline": {"q": {"mae": 0.01}},
    }
    assert "near-zero variance" in scorer_warnings(flat, ["q"])[0]
    useless = {
        "judge_score_std": {"q": 1.2},
        "quality": {"q": {"mae": 0.9}},
        "baseline": {"q": {"mae": 0.91}},
    }
    assert "not below the predict-the-mean baseline" in scorer_warnings(useless, ["q"])[0]
    good = {"judge_score_std": {"q": 1.2}, "quality": {"q": {"mae": 0.4}}, "baseline": {"q": {"mae": 0.9}}}
    assert scorer_warnings(good, ["q"]) == []
