"""The judge-enabled sample config, run from the `megaqwen-data` CLI with the tiny judge it names.

The config is copied with only what a 30-document slice needs changed: where the tiny judge is,
and token budgets the slice can supply (the shipped ones are sized for the whole sample corpus).
Everything else (steps, dedup, judge rubric and sample size, scorer, remix factors) is the file's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from megaqwen.data.blend import load_blend_recipe
from megaqwen.data_pipeline.cli import main
from megaqwen.data_pipeline.io import read_documents

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "data_pipeline/configs/pipeline_sample_judge.yaml"
N_DOCS = 31  # 30 lines of the sample corpus and one exact duplicate


def _slice(path: Path) -> list[str]:
    """The first documents of the sample corpus by kind: mostly decent ones plus planted junk."""
    lines = (REPO / "data_pipeline/samples/corpus.jsonl").read_text(encoding="utf-8").splitlines()
    want = {"doc-": 24, "lowq-": 3, "lang-": 1, "pii-": 1, "bad-": 1}
    out = []
    for x in lines:
        kind = next((k for k in want if f'"id": "{k}' in x), None)
        if kind and want[kind] > 0:
            want[kind] -= 1
            out.append(x)
    copy = json.loads(out[0])
    out.append(json.dumps({**copy, "id": "copy-of-first"}))  # an exact duplicate for the dedup stage
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return out


def test_sample_judge_config_runs_from_cli(tmp_path: Path, capsys):
    assert main(["tiny-judge", "--out", str(tmp_path / "tiny-judge")]) == 0
    corpus = tmp_path / "slice.jsonl"
    assert len(_slice(corpus)) == N_DOCS
    cfg = yaml.safe_load(CONFIG.read_text())
    assert cfg["judge"]["backend"] == "local" and cfg["judge"]["model"] == "outputs/tiny-judge"
    cfg["judge"]["model"] = str(tmp_path / "tiny-judge")
    for stage in cfg["remix"]["stages"]:
        stage["token_budget"] = 10_000  # 30 docs hold ~15k tokens; the shipped 200k/100k need the corpus
    cfg_path = tmp_path / "pipeline_sample_judge.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(
        ["pipeline", "--config", str(cfg_path), "--input", str(corpus), "--output-dir", str(out),
         "--workers", "1", "--no-progress"]
    )  # fmt: skip
    printed = capsys.readouterr()
    assert rc == 0, printed.err[-3000:]
    ran = json.loads(printed.out.strip().splitlines()[-1])["ran_tasks"]
    assert list(ran) == [
        "filter",
        "dedup",
        "judge",
        "train_scorer",
        "train_domains",
        "annotate",
        "shards",
        "recipes",
        "report",
    ]
    assert len(ran["judge"]) == cfg["input"]["parts_per_file"]

    # per-dimension judge scores: expectations over the digit probabilities, in [0, 5]
    dims = cfg["judge"].get("dimensions") or ["educational_value", "knowledge_density", "coherence", "safety"]
    labels = [
        json.loads(x) for p in sorted((out / "judge").glob("*.jsonl")) for x in p.read_text().splitlines()
    ]
    kept = sum(1 for p in (out / "filtered").glob("*.jsonl.zst") for _ in read_documents(p))
    assert 4 <= len(labels) <= kept <= N_DOCS  # sample_size 120 > slice: every surviving doc is judged
    for r in labels:
        assert set(r["scores"]) == set(dims) | {"overall"} and set(r["mass"]) == set(dims)
        assert all(0.0 <= r["scores"][d] <= 5.0 for d in dims)
        assert math.isclose(r["scores"]["overall"], sum(r["scores"][d] for d in dims) / len(dims))

    # the distilled scorer's held-out agreement with the judge, per dimension
    metrics = json.loads((out / "scorer" / "metrics.json").read_text())
    assert metrics["train"] + metrics["heldout"] == len(labels) and metrics["heldout"] >= 1
    assert set(metrics["quality"]) == set(dims) | {"overall"}
    for a in metrics["quality"].values():
        assert {"pearson", "spearman", "mae", "within_0.5"} <= set(a) and 0 <= a["mae"] <= 5

    # stats and report
    stats = json.loads((out / "stats.json").read_text())
    assert stats["scorer_agreement"] == metrics
    # the random tiny judge scores everything alike: the report says so instead of looking healthy
    assert any("near-zero variance" in w for w in metrics["warnings"])
    report = (out / "report" / "report.md").read_text()
    assert "Distilled scorer vs judge (held-out)" in report and "Re-mixing" in report
    for png in ("removal_reasons.png", "score_histograms.png", "domain_mix.png"):
        assert (out / "report" / png).stat().st_size > 5000
    docs = [d for p in (out / "annotated").rglob("*.jsonl.zst") for d in read_documents(p)]
    assert docs and all(set(d.metadata["quality"]) == set(dims) | {"overall"} for d in docs)
    for stage in cfg["remix"]["stages"]:
        assert load_blend_recipe(out / "recipes" / f"{stage['name']}.json").name == stage["name"]
    _check_step_accounting(stats, cfg, n_lines=N_DOCS, annotated=len(docs), judged=len(labels))


def _check_step_accounting(stats: dict, cfg: dict, n_lines: int, annotated: int, judged: int) -> None:
    """stats.json has every step of every stage with kept/removed/reasons, and the counts chain:
    what a step keeps is what the next one sees, from the input lines to the documents in the shards."""
    steps = stats["steps"]
    top = [r for r in steps["filter"] if "/" not in r["name"]]  # routed sub-steps are detail rows
    chain = top + steps["dedup"] + steps["annotate"][1:] + steps["shards"]
    names = [r["name"] for r in chain]
    assert names == ["read"] + [x["name"] for x in cfg["steps"]] + [
        "exact_dedup",
        "minhash_dedup",
        "tokens",
        "quality",
        "shards",
    ]
    assert chain[0]["seen"] == n_lines
    for prev, r in zip(chain, chain[1:]):
        assert r["seen"] == prev["kept"], (prev, r)
    for r in chain:
        assert r["seen"] == r["kept"] + r["removed"] and sum(r["reasons"].values()) == r["removed"], r
    assert chain[-1]["kept"] == annotated
    # applying the dedup decisions at annotate time removes exactly what the dedup stage decided
    applied = steps["annotate"][0]
    assert applied["name"] == "dedup" and applied["seen"] == steps["dedup"][0]["seen"]
    assert applied["removed"] == sum(r["removed"] for r in steps["dedup"])
    by_name = {r["name"]: r for r in chain}
    assert by_name["read"]["reasons"] and by_name["route"]["reasons"]  # the planted junk, with reasons
    # the router's removals are exactly its sub-steps', reason for reason
    sub: dict[str, int] = {}
    for r in steps["filter"]:
        if "/" in r["name"]:
            assert r["seen"] == r["kept"] + r["removed"] and sum(r["reasons"].values()) == r["removed"], r
            for k, v in r["reasons"].items():
                sub[k] = sub.get(k, 0) + v
    assert sub == by_name["route"]["reasons"]
    assert by_name["exact_dedup"]["reasons"] == {"exact_dedup:duplicate": 1}
    merged: dict[str, int] = {}
    for r in chain:
        for k, v in r["reasons"].items():
            merged[k] = merged.get(k, 0) + v
    assert stats["removal_reasons"] == merged
    assert steps["judge"] == {"labelled": judged, "candidates": steps["dedup"][-1]["kept"]}
