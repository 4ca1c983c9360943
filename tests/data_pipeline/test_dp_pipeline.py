"""End to end on a slice of the sample corpus: malformed lines, shards, recipes, report; kill + resume."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megaqwen.data.blend import load_blend_recipe
from megaqwen.data_pipeline.config import PipelineConfig, StageMix, load_config
from megaqwen.data_pipeline.io import read_documents
from megaqwen.data_pipeline.pipeline import run_pipeline, run_stage
from megaqwen.data_pipeline.remix import measure_blend, meta_path
from megaqwen.data_pipeline.samples.make_corpus import make_records

REPO = Path(__file__).resolve().parents[2]
STEPS = yaml.safe_load((REPO / "data_pipeline/configs/pipeline_sample.yaml").read_text())["steps"]


def _slice(path: Path, n_good: int) -> tuple[int, int]:
    """Write all malformed and planted lines plus `n_good` decent documents; returns (lines, malformed)."""
    lines, malformed, good = [], 0, 0
    records = make_records()
    sources = set()  # the originals of planted duplicates stay, so the duplicates have something to match
    for line in records:
        with contextlib.suppress(json.JSONDecodeError, AttributeError):
            sources.add(json.loads(line).get("duplicate_of"))
    for line in records:
        try:
            rec = json.loads(line)
            ok = isinstance(rec, dict) and isinstance(rec.get("text"), str)
        except json.JSONDecodeError:
            ok = False
        if not ok:
            malformed += 1
        elif rec["id"].startswith("doc-") and rec["id"] not in sources:
            if good >= n_good:
                continue
            good += 1
        lines.append(line)
    path.write_text("\n".join(lines) + "\n")
    return len(lines), malformed


def _cfg(tmp: Path, inputs: list[str], parts: int = 2) -> PipelineConfig:
    cfg = PipelineConfig()
    cfg.input.paths, cfg.input.parts_per_file = inputs, parts
    cfg.output_dir = str(tmp / "out")
    cfg.steps = STEPS
    cfg.scorer.max_length, cfg.scorer.batch_size = 32, 16  # MiniLM on 2 CPU cores: keep it short
    cfg.remix.stages = [
        StageMix(
            name="stage-4k",
            seq_length=64,
            rope_base=1e4,
            token_budget=20_000,
            max_epochs=4,
            factors={"e-commerce": 0.5, "social media": 0.5, "technology": 2.0, "science": 2.0},
        ),
        StageMix(name="stage-32k", seq_length=256, rope_base=1e6, token_budget=5_000, max_epochs=4),
    ]
    cfg.validate()
    return cfg


def test_end_to_end_sample_slice(tmp_path: Path):
    corpus = tmp_path / "corpus.jsonl"
    _, n_malformed = _slice(corpus, n_good=30)
    cfg = _cfg(tmp_path, [str(corpus)])
    run_pipeline(cfg, progress=False)
    out = cfg.out
    stats = json.loads((out / "stats.json").read_text())
    read = stats["steps"]["filter"][0]
    assert read["name"] == "read" and read["removed"] == n_malformed == 7  # counted, never fatal
    assert read["reasons"]["malformed:invalid_json"] == 3 and read["reasons"]["malformed:missing_text"] == 1
    kept_ids = {d.id for p in (out / "annotated").rglob("*.jsonl.zst") for d in read_documents(p)}
    assert not any(i.startswith("lowq-") for i in kept_ids)  # planted junk all gone
    # of each planted duplicate pair exactly one survives (whichever comes first in the file)
    pairs = [
        (json.loads(x)["id"], json.loads(x)["duplicate_of"])
        for x in corpus.read_text().splitlines()
        if '"duplicate_of"' in x
    ]
    assert len(pairs) == 16 and all((a in kept_ids) != (b in kept_ids) for a, b in pairs)
    assert sum(i.startswith("pii-") for i in kept_ids) == 6
    texts = [d.text for p in (out / "annotated").rglob("*.jsonl.zst") for d in read_documents(p)]
    assert not any("@example.com" in t for t in texts) and any("<EMAIL>" in t for t in texts)
    # re-mixing: the Megatron blend over the emitted shards hits every stage's planned weights within 1%
    for stage in cfg.remix.stages:
        recipe = out / "recipes" / f"{stage.name}.json"
        assert load_blend_recipe(recipe).name == stage.name  # the trainer accepts the recipe
        assert json.loads(meta_path(recipe).read_text())["rope_base"] == stage.rope_base
        measured = measure_blend(recipe, n_samples=2000, seq_length=stage.seq_length)
        plan = stats["plans"][stage.name]
        for dom, m in measured.items():
            assert abs(m["measured"] - plan["weights"][dom]) < 0.01, (stage.name, dom, m)
        # drawing exactly the stage's token budget repeats no domain more than max_epochs (+ one sample)
        at_budget = measure_blend(
            recipe, n_samples=stage.token_budget // stage.seq_length, seq_length=stage.seq_length
        )
        for dom, m in at_budget.items():
            assert m["epochs"] <= stage.max_epochs + stage.seq_length / stats["domain_tokens"][dom], (dom, m)
    for png in ("removal_reasons.png", "domain_mix.png"):
        assert (out / "report" / png).stat().st_size > 5000
    assert "Re-mixing" in (out / "report" / "report.md").read_text()
    # a rerun does nothing: every task has its marker
    assert all(not ran for ran in run_pipeline(cfg, progress=False).values())


def test_killed_run_resumes_without_redoing_or_losing(tmp_path: Path):
    corpus = tmp_path / "big.jsonl"
    base = make_records()
    corpus.write_text("\n".join(base * 4) + "\n")  # ~1600 lines, 6 tasks of ~0.5 s each
    cfg = _cfg(tmp_path, [str(corpus)], parts=6)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "megaqwen.data_pipeline.cli",
            "pipeline",
            "--config",
            str(cfg_file),
            "--stage",
            "filter",
            "--workers",
            "1",
            "--no-progress",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    markers = cfg.out / "markers" / "filter"
    deadline = time.time() + 120
    while not (markers.is_dir() and any(markers.glob("*.json"))) and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {p.name: p.stat().st_mtime_ns for p in markers.glob("*.json")}
    assert 1 <= len(before) < 6, f"kill came too late or too early: {sorted(before)}"

    cfg2 = load_config(cfg_file)
    ran = run_stage(cfg2, "filter", progress=False)
    assert sorted(ran) == sorted(set(range(6)) - {int(n[:5]) for n in before})  # finished work not redone
    assert {p.name: p.stat().st_mtime_ns for p in markers.glob("*.json") if p.name in before} == before

    clean = _cfg(tmp_path / "clean", [str(corpus)], parts=6)
    run_stage(clean, "filter", progress=False)

    def ids(c):
        return sorted(
            d.id for t in range(6) for d in read_documents(c.out / "filtered" / f"{t:05d}.jsonl.zst")
        )

    resumed = ids(cfg2)
    assert resumed == ids(clean) and len(resumed) > 4 * 300  # nothing lost, nothing doubled


def test_judge_labels_train_distilled_scorer(tmp_path: Path):
    from megaqwen.data_pipeline.tiny_judge import save_tiny_judge

    corpus = tmp_path / "corpus.jsonl"
    _slice(corpus, n_good=12)
    cfg = _cfg(tmp_path, [str(corpus)], parts=1)
    cfg.judge.backend, cfg.judge.model = "local", str(save_tiny_judge(tmp_path / "judge"))
    cfg.judge.sample_size, cfg.judge.max_doc_chars, cfg.judge.dimensions = (
        10,
        300,
        ["educational_value", "safety"],
    )
    cfg.domains.backend = "distilled"
    cfg.validate()
    for stage in ("filter", "dedup", "judge", "train_scorer", "annotate"):
        run_stage(cfg, stage, progress=False)
    labels = [json.loads(x) for x in (cfg.out / "judge" / "00000.jsonl").read_text().splitlines()]
    assert len(labels) == 10 and all(0 <= r["scores"]["safety"] <= 5 for r in labels)
    assert all(sum(r["domain_probs"].values()) == pytest.approx(1.0) for r in labels)
    metrics = json.loads((cfg.out / "scorer" / "metrics.json").read_text())
    assert metrics["train"] == 8 and metrics["heldout"] == 2
    assert set(metrics["quality"]) == {"educational_value", "safety", "overall"}
    docs = [d for p in (cfg.out / "annotated").rglob("*.jsonl.zst") for d in read_documents(p)]
    assert docs and all(
        set(d.metadata["quality"]) == {"educational_value", "safety", "overall"} for d in docs
    )
    assert all(d.metadata["domain"] in cfg.domains.taxonomy for d in docs)


def test_document_without_tokens_is_counted_not_fatal(tmp_path: Path):
    """A document that reaches annotation with no tokens (empty text, no step to stop it) is dropped
    and counted there: it would be a lone EOD, and a domain holding only such documents would have
    no shard (tokenize refuses to write an empty one) and fail the run."""
    docs = [
        {"id": "a", "text": "A short note about rivers, hills and the town between them."},
        {"id": "e", "text": ""},
        {"id": "b", "text": "Bread needs flour, water, salt and yeast, and an hour to rise."},
    ]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    cfg = _cfg(tmp_path, [str(corpus)], parts=1)
    cfg.steps = []  # normalize would drop it first ("normalize:empty")
    cfg.remix.stages = [StageMix(name="s", seq_length=8, token_budget=0)]
    run_pipeline(cfg, progress=False)
    steps = json.loads((cfg.out / "stats.json").read_text())["steps"]
    tokens = next(r for r in steps["annotate"] if r["name"] == "tokens")
    assert tokens == {
        "name": "tokens",
        "seen": 3,
        "kept": 2,
        "removed": 1,
        "modified": 0,
        "reasons": {"tokens:empty": 1},
        "changes": {},
    }
    assert steps["shards"][0]["seen"] == steps["shards"][0]["kept"] == 2
    ids = {d.id for p in (cfg.out / "annotated").rglob("*.jsonl.zst") for d in read_documents(p)}
    assert ids == {"a", "b"}
