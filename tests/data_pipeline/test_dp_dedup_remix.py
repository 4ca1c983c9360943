"""Dedup removes planted near-duplicates and keeps distinct documents; re-mix plans and blending."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megaqwen.data_pipeline.config import StageMix
from megaqwen.data_pipeline.remix import plan_stage
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
    # explicit weights naming a domain that has no documents: its weight is spread, and reported
    w = plan_stage(tokens, StageMix(weights={"e-commerce": 0.2, "technology": 0.2, "news": 0.4, "law": 0.2}))
    assert w["missing"] == ["law"] and w["weights"] == pytest.approx(
        {"e-commerce": 0.25, "technology": 0.25, "news": 0.5}
    )
    with pytest.raises(ValueError, match=r"no documents: \['law'\]"):
        plan_stage(tokens, StageMix(weights={"law": 1.0}))
    with pytest.raises(ValueError, match="max_epochs"):
        plan_stage(tokens, StageMix(token_budget=10_000, max_epochs=2))


def _shards(root: Path, tokens: dict[str, int]) -> dict[str, str]:
    """One tiny shard per domain holding `tokens[d]` tokens in documents of 50; returns recipe prefixes."""
    from megaqwen.data.indexed import IndexedDatasetBuilder

    for d, n in tokens.items():
        with IndexedDatasetBuilder(root / "shards" / d) as b:
            for k in range(0, n, 50):
                b.add_document(np.arange(k, min(k + 50, n), dtype=np.int32))
    return {d: f"../shards/{d}" for d in tokens}


def test_recipe_is_the_trainers_format_with_plan_beside_it(tmp_path: Path):
    from megaqwen.data.blend import load_blend_recipe
    from megaqwen.data_pipeline.remix import meta_path, write_recipe

    stage = StageMix(name="stage-4k", seq_length=64, rope_base=1e6, token_budget=0)
    tokens = {"a": 1000, "b": 3000}
    plan = plan_stage(tokens, stage)
    path = tmp_path / "recipes" / "stage-4k.json"
    write_recipe(path, stage, plan, {"a": "../shards/a", "b": "../shards/b"}, tokens)
    recipe = load_blend_recipe(path)  # what `megaqwen-train data.path=...json` does
    assert recipe.name == "stage-4k" and recipe.weights == pytest.approx((0.25, 0.75))
    assert recipe.prefixes == (
        str(tmp_path / "recipes" / "../shards/a"),
        str(tmp_path / "recipes" / "../shards/b"),
    )
    meta = json.loads(meta_path(path).read_text())
    assert meta["rope_base"] == 1e6 and meta["seq_length"] == 64 and meta["weights"] == plan["weights"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["stage-4k.json", "stage-4k.meta.json"]


def test_measured_blend_tracks_plan_and_catches_a_wrong_recipe(tmp_path: Path):
    """measure_blend draws through the trainer's build_dataset: the plan's weights within 1%, and a
    recipe whose weights differ from the plan is measured as different (the check can fail)."""
    from megaqwen.data_pipeline.remix import measure_blend, write_recipe

    tokens = {"e-commerce": 5000, "technology": 1000, "news": 4000}
    stage = StageMix(
        seq_length=32, token_budget=10_000, max_epochs=2, factors={"e-commerce": 0.5, "technology": 2.0}
    )
    plan = plan_stage(tokens, stage)
    path = tmp_path / "recipes" / "s.json"
    write_recipe(path, stage, plan, _shards(tmp_path, tokens), tokens)
    got = measure_blend(path, n_samples=1000, seq_length=32)
    assert set(got) == set(tokens)
    for d, m in got.items():
        assert abs(m["measured"] - plan["weights"][d]) < 0.01, (d, m)
    at_budget = measure_blend(path, n_samples=10_000 // 32, seq_length=32)
    assert max(m["epochs"] for m in at_budget.values()) <= 2 + 32 / 1000
    # technology is capped at 2 epochs of its 1000 tokens: it really is read ~2 times at the budget
    assert at_budget["technology"]["epochs"] == pytest.approx(2.0, abs=32 / 1000)

    rec = json.loads(path.read_text())
    for e in rec["datasets"]:
        e["weight"] = 1.0  # equal weights: no longer the plan
    path.write_text(json.dumps(rec))
    wrong = measure_blend(path, n_samples=1000, seq_length=32)
    assert max(abs(wrong[d]["measured"] - plan["weights"][d]) for d in tokens) > 0.05
