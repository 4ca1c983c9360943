"""Maths reaches the maths filters, web junk goes, forum attributions stay: measured with the shipped
sample config on `make_web_eval_corpus` (templates and words unlike the shipped eval corpus)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megaqwen.data_pipeline.config import load_config
from megaqwen.data_pipeline.document import Document
from megaqwen.data_pipeline.io import read_documents
from megaqwen.data_pipeline.samples import make_web_eval_corpus as mk
from megaqwen.data_pipeline.samples.evaluate_corpus import evaluate
from megaqwen.data_pipeline.steps.base import build_steps
from megaqwen.data_pipeline.steps.content import classify

pytest.importorskip("py3langid", reason="the sample config's langid step needs py3langid (the `data` extra)")


def test_unseen_style_removal_rates(tmp_path: Path):
    corpus = tmp_path / "web_eval.jsonl"
    recs = mk.build(seed=7, n_prose=10, n_math=10, n_code=10, n_junk=8)
    corpus.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    cfg = load_config("sample", {"output_dir": str(tmp_path / "out"), "workers": 1})
    res = evaluate(cfg, corpus)
    loss = res["clean_loss"]
    assert loss["math"]["rate"] <= 0.10, (loss["math"], res["clean_loss_reasons"].get("math"))
    assert loss["prose"]["rate"] <= 0.05, res["clean_loss_reasons"].get("prose")
    assert loss["code"]["rate"] <= 0.10
    for lang in mk.PROSE:
        assert loss[f"prose:{lang}"]["rate"] <= 0.10, (lang, res["clean_loss_reasons"].get(f"prose:{lang}"))
    assert res["junk_recall"]["rate"] >= 0.90, res["junk_recall"]
    # every equation genre reached the maths filters
    assert res["content_type"]["math"]["rate"] == 1.0, res["content_type"]["math"]
    # forum threads keep their "X replied:" lines
    kept = {d.id: d for p in (cfg.out / "filtered").glob("*.jsonl.zst") for d in read_documents(p)}
    atts = [(r["id"], a) for r in recs for a in r["label"].get("attributions", []) if r["id"] in kept]
    assert atts and all(a in kept[i].text for i, a in atts)


def test_math_spans_route_to_maths_not_prices():
    sparse = mk.math_sparse(mk.random.Random(0))
    assert classify(sparse, {})[0] == "math"
    assert classify("It cost $5 at the market and $12 online. " * 6, {})[0] == "prose"
    assert classify("Two apples ($3) and pears ($4) were sold to $1000 buyers today. " * 4, {})[0] == "prose"


def test_web_junk_rules_spare_clean_traps():
    (junk,) = build_steps([{"name": "web_junk"}])
    rng = mk.random.Random(1)
    for t in mk.TRAPS:  # cookies in a recipe, informed consent, an article on JavaScript, acronyms
        a, b = mk._sentences("en", rng, 2)
        assert junk(Document("t", t.format(a=a, b=b), {})) is not None, t[:40]
    assert junk(Document("z", mk.prose("zh", rng), {})) is not None  # no case: never "uppercase"
    assert junk(Document("u", mk.junk_caps(rng), {})) is None and junk.last_reason == "web_junk:uppercase"
    assert junk(Document("c", mk.junk_notice(rng), {})) is None and junk.last_reason == "web_junk:boilerplate"


def test_c4_keeps_attributions_and_notice_lines_only():
    (c4,) = build_steps(
        [
            {
                "name": "c4",
                "keep_attribution_lines": True,
                "notice_lines_only": True,
                "filter_no_terminal_punct": False,
            }
        ]
    )
    text, atts = mk.forum(mk.random.Random(2))
    text += "\n\nPlease enable JavaScript to see the comments."
    text += "\nJavaScript engines compile code just in time today."
    d = c4(Document("f", text, {}))
    assert d is not None and all(a in d.text for a in atts)
    assert "enable JavaScript" not in d.text and "compile code just in time" in d.text
    (plain,) = build_steps([{"name": "c4"}])  # C4 as published drops both
    d = plain(Document("f", text, {}))
    assert d is None or not all(a in d.text for a in atts)  # ("Anna replied:" is under 3 words)
