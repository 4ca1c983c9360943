"""Dedup removes planted near-duplicates and keeps distinct documents; re-mix plans and blending."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from megaqwen.data_pipeline.config import StageMix
from megaqwen.data_pipeline.remix import blend_indices, plan_stage
from megaqwen.data_pipeline.samples.make_corpus import make_records
from megaqwen.data_pipeline.steps.dedup import DedupConfig, Signer, exact_key, find_duplicates


def _dedup(texts, cfg=None):
    cfg = cfg or DedupConfig()
    signer = Signer(cfg)
    exact = np.array([exact_key(t) for t in texts], dtype=np.uint64)
    sigs = np.stack([signer.signature(t) for t in texts])
    return find_duplicates(exact, sigs, cfg)[0]


def test_dedup_on_sample_corpus_removes_exactly_the_planted_duplicates():
    recs = []
    for line in make_records():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and isinstance(r.get("text"), str) and r["id"].startswith(("doc-", "dup-")):
            recs.append(r)
    # originals first, so each duplicate must point back at its source
    recs.sort(key=lambda r: r["id"].startswith("dup-"))
    removed = _dedup([r["text"] for r in recs])
    got = {recs[i]["id"]: (recs[j]["id"], kind) for i, (j, kind) in removed.items()}
    want = {
        r["id"]: (r["duplicate_of"], "exact" if r["id"].startswith("dup-exact") else "near")
        for r in recs
        if r["id"].startswith("dup-")
    }
    assert len(want) == 16 and got == want  # every planted duplicate, and no distinct document


def test_dedup_handmade():
    a = (
        "The committee met on Tuesday to discuss the new library opening hours and agreed to extend them "
        "on weekdays, starting in March, after a survey showed strong demand from students and workers."
    )
    near = a.replace("workers.", "employees.")  # 1 of 30 word 5-grams differs: Jaccard 29/31
    far = a.replace("Tuesday", "Wednesday").replace("strong", "clear")  # 2 edits, 10 5-grams: Jaccard 0.5
    other = (
        "A recipe for bread needs flour, water, salt and yeast; the dough rests overnight in a cool place "
        "before it is shaped, proofed again and baked in a very hot oven until the crust is dark."
    )
    removed = _dedup([a, other, near, a.upper(), far])
    assert removed == {2: (0, "near"), 3: (0, "exact")}  # `far` is below the 0.75 threshold: kept


def test_plan_factors_and_epoch_cap():
    tokens = {"e-commerce": 500, "technology": 100, "news": 400}
    free = plan_stage(tokens, StageMix(factors={"e-commerce": 0.5, "technology": 2.0}))
    # natural shares .5/.1/.4 times factors .5/2/1 = .25/.2/.4, normalised by .85
    assert free["weights"] == pytest.approx(
        {"e-commerce": 0.25 / 0.85, "technology": 0.2 / 0.85, "news": 0.4 / 0.85}
    )
    capped = plan_stage(
        tokens, StageMix(factors={"e-commerce": 0.5, "technology": 2.0}, token_budget=1000, max_epochs=2)
    )
    assert capped["capped"] == ["technology"] and capped["weights"]["technology"] == pytest.approx(0.2)
    assert sum(capped["weights"].values()) == pytest.approx(1.0)
    assert max(capped["epochs"].values()) <= 2 + 1e-9
    # e-commerce and news keep their target ratio after redistribution
    assert capped["weights"]["e-commerce"] / capped["weights"]["news"] == pytest.approx(0.25 / 0.4)
    with pytest.raises(ValueError, match="max_epochs"):
        plan_stage(tokens, StageMix(token_budget=10_000, max_epochs=2))


def test_megatron_blending_is_deterministic_and_tracks_weights():
    w = [0.5, 0.3, 0.2]
    idx = blend_indices(w, 1000)
    assert (idx == blend_indices(w, 1000)).all()
    for n in (10, 100, 1000):
        counts = np.bincount(idx[:n], minlength=3)
        assert np.all(np.abs(counts - np.array(w) * n) <= 1)


def test_recipe_weights_written_relative(tmp_path: Path):
    from megaqwen.data_pipeline.remix import load_recipe, write_recipe

    stage = StageMix(name="stage-4k")
    plan = plan_stage({"a": 10, "b": 30}, stage)
    write_recipe(
        tmp_path / "recipes" / "stage-4k.json",
        stage,
        plan,
        {"a": "../shards/a", "b": "../shards/b"},
        {"a": 10, "b": 30},
    )
    rec = json.loads((tmp_path / "recipes" / "stage-4k.json").read_text())
    assert rec["name"] == "stage-4k" and set(rec) == {"name", "datasets", "meta"}
    assert [d["weight"] for d in rec["datasets"]] == pytest.approx([0.25, 0.75])
    assert load_recipe(tmp_path / "recipes" / "stage-4k.json")[0][0] == tmp_path / "recipes" / "../shards/a"
