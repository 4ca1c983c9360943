"""A changed config never mixes with old results: affected stages re-run, the rest are reused; a domain
named with a space gets a slug file name while recipes and plans keep its name.

The corpus is 8 made-up prose documents of 20, 40, 90 and 160 words; the steps are normalize and
gopher_quality only, and one domain (`social media`) labelled by MiniLM without the student, so a
whole pipeline run stays a few seconds of work.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import shutil
from pathlib import Path

import pytest
import yaml

from megaqwen.data.blend import load_blend_recipe
from megaqwen.data_pipeline.cli import main
from megaqwen.data_pipeline.config import PipelineConfig
from megaqwen.data_pipeline.io import read_documents
from megaqwen.data_pipeline.pipeline import run_stage
from megaqwen.data_pipeline.remix import measure_blend, meta_path
from megaqwen.data_pipeline.slug import domain_slugs, slug

NOUNS = "river valley town bridge garden market school window kitchen harbour forest meadow library".split()  # noqa: SIM905
ADJS = "quiet narrow bright ancient gentle busy golden humble distant crowded simple patient careful".split()  # noqa: SIM905
VERBS = "crosses follows shelters reaches faces borders joins overlooks circles feeds".split()  # noqa: SIM905
LENGTHS = (20, 40, 90, 160)  # words; thresholds 10 and 60 fall well between them


def _doc(seed: int, words: int) -> str:
    r = random.Random(seed)
    out: list[str] = []
    while len(out) < words:
        out += (f"The {r.choice(ADJS)} {r.choice(NOUNS)} {r.choice(VERBS)} the {r.choice(ADJS)} "
                f"{r.choice(NOUNS)} and it is {r.choice(ADJS)}.").split()  # fmt: skip
    return " ".join(out[:words]).rstrip(".") + "."


def _write_inputs(root: Path, parts: int = 1) -> tuple[Path, dict[str, str]]:
    docs = {f"w{n}-{i}": _doc(100 * n + i, n) for n in LENGTHS for i in range(2)}
    corpus = root / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"id": k, "text": t}) for k, t in docs.items()) + "\n")
    cfg = {
        "input": {"paths": [str(corpus)], "parts_per_file": parts},
        "output_dir": str(root / "out"),
        "workers": 1,
        "steps": [{"name": "normalize"}, {"name": "gopher_quality", "min_doc_words": 10}],
        "scorer": {"max_length": 32, "batch_size": 16},
        "domains": {"taxonomy": {"social media": "personal posts, threads and comments"}, "student": False},
        "remix": {"stages": [{"name": "s", "seq_length": 32, "token_budget": 0}]},
    }
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return root / "cfg.yaml", docs


def _pipeline(cfg: Path, out: Path, *extra: str) -> int:
    return main(["pipeline", "--config", str(cfg), "--output-dir", str(out), "--no-progress", *extra])


def _annotated_ids(out: Path) -> set[str]:
    return {d.id for p in (out / "annotated").rglob("*.jsonl.zst") for d in read_documents(p)}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> tuple[Path, dict[str, str], Path]:
    root = tmp_path_factory.mktemp("rerun")
    cfg, docs = _write_inputs(root)
    assert _pipeline(cfg, root / "out") == 0
    assert _annotated_ids(root / "out") == set(docs)  # min_doc_words 10 keeps every document
    return cfg, docs, root / "out"


def test_changed_threshold_reruns_affected_stages_only(baseline, tmp_path: Path, capsys, caplog):
    cfg, docs, base_out = baseline
    out = tmp_path / "out"
    shutil.copytree(base_out, out)  # output_dir is no part of a fingerprint: a copied folder stays valid
    capsys.readouterr()

    def ran() -> dict[str, list[int]]:
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ran_tasks"]

    assert _pipeline(cfg, out) == 0 and not any(ran().values())  # same config: everything reused

    # a changed filter threshold: refused before any work, naming the key and the fix
    markers_before = {p: p.read_bytes() for p in (out / "markers").rglob("*.json")}
    assert _pipeline(cfg, out, "steps.gopher_quality.min_doc_words=60") == 1
    err = capsys.readouterr().err
    assert "changed: steps.gopher_quality.min_doc_words 10 -> 60" in err and "--rerun" in err
    assert {p: p.read_bytes() for p in (out / "markers").rglob("*.json")} == markers_before

    caplog.set_level(logging.INFO, logger="megaqwen.data_pipeline")
    assert _pipeline(cfg, out, "steps.gopher_quality.min_doc_words=60", "--rerun") == 0
    assert all(ran().values())  # the filter feeds every later stage: all of them ran again
    assert "filter: re-running" in caplog.text
    assert "changed: steps.gopher_quality.min_doc_words 10 -> 60" in caplog.text
    expected = {k for k, t in docs.items() if len(t.split()) >= 60}
    assert _annotated_ids(out) == expected and expected != set(docs)  # the new result, nothing old kept
    stats = json.loads((out / "stats.json").read_text())
    assert sum(stats["domain_tokens"].values()) < sum(
        json.loads((base_out / "stats.json").read_text())["domain_tokens"].values()
    )

    # a remix-only change: filter .. shards are reused untouched, recipes and report re-run
    filter_marker = out / "markers" / "filter" / "00000.json"
    before = filter_marker.stat().st_mtime_ns
    caplog.clear()
    assert _pipeline(cfg, out, "steps.gopher_quality.min_doc_words=60", "remix.stages.s.max_epochs=2",
                     "--rerun") == 0  # fmt: skip
    got = ran()
    assert {s for s, tasks in got.items() if tasks} == {"recipes", "report"}, got
    assert filter_marker.stat().st_mtime_ns == before
    assert "filter: re-running" not in caplog.text and "recipes: re-running" in caplog.text
    assert json.loads(meta_path(out / "recipes" / "s.json").read_text())["max_epochs"] == 2.0


def test_domain_with_space_gets_slug_files_and_keeps_its_name(baseline):
    _, _, out = baseline
    names = [p.name for p in (out / "shards").iterdir()] + [p.name for p in (out / "annotated").iterdir()]
    assert names and all(" " not in n for n in names)
    assert {"social-media.bin", "social-media.idx", "social-media"} <= set(names)
    recipe_path = out / "recipes" / "s.json"
    recipe = load_blend_recipe(recipe_path)  # the trainer's reader
    assert [Path(p).name for p in recipe.prefixes] == ["social-media"]
    assert "social media = ../shards/social-media" in json.loads(recipe_path.read_text())["description"]
    meta = json.loads(meta_path(recipe_path).read_text())
    assert meta["shards"] == {"social media": "../shards/social-media"}
    assert set(meta["weights"]) == {"social media"}
    # drawn through the trainer's dataset builder, reported under the domain's name
    measured = measure_blend(recipe_path, n_samples=20, seq_length=32)
    assert set(measured) == {"social media"} and measured["social media"]["measured"] == 1.0
    docs = [d for p in (out / "annotated").rglob("*.jsonl.zst") for d in read_documents(p)]
    assert {d.metadata["domain"] for d in docs} == {"social media"}


def test_slugs_are_safe_and_distinct():
    assert slug("Social Media") == "social-media" and slug("e-commerce") == "e-commerce"
    assert slug("Health & Fitness!") == "health-fitness" and slug("???") == "domain"
    names = ["social media", "Social Media", "social-media", "news"]
    got = domain_slugs(names)
    assert len(set(got.values())) == len(names)
    assert all(s.replace("-", "").replace("_", "").isalnum() and s.islower() for s in got.values())
    assert got == domain_slugs(reversed(names))  # the same names always get the same files


def test_slurm_ranks_rerun_their_own_tasks_and_downstream_waits(tmp_path: Path):
    """Two SLURM array tasks of a changed filter stage: each redoes only its own stale task, and dedup
    refuses to start while one of them still holds a result of the old config."""
    cfg_path, docs = _write_inputs(tmp_path, parts=2)
    data = yaml.safe_load(cfg_path.read_text())
    from megaqwen.data_pipeline.config_util import from_dict

    old = from_dict(PipelineConfig, copy.deepcopy(data))
    for stage in ("filter", "dedup"):
        run_stage(old, stage, progress=False)
    data["steps"][1]["min_doc_words"] = 60
    new = from_dict(PipelineConfig, data)
    with pytest.raises(ValueError, match="min_doc_words 10 -> 60.*--rerun"):
        run_stage(new, "filter", rank=0, world=2, progress=False)
    assert run_stage(new, "filter", rank=0, world=2, progress=False, rerun=True) == [0]
    with pytest.raises(RuntimeError, match=r"tasks \[1\] of 2 have no marker written under this config") as e:
        run_stage(new, "dedup", progress=False, rerun=True)
    assert "min_doc_words 10 -> 60" in "".join(e.value.__notes__)
    assert run_stage(new, "filter", rank=1, world=2, progress=False, rerun=True) == [1]
    assert run_stage(new, "dedup", progress=False, rerun=True) == [0]
    kept = {d.id for t in range(2) for d in read_documents(new.out / "filtered" / f"{t:05d}.jsonl.zst")}
    assert kept == {k for k, t in docs.items() if len(t.split()) >= 60}
    # the old config again: its own dedup results would read the new filter's files, so it is refused
    with pytest.raises(RuntimeError, match="stage 'filter' is incomplete") as e:
        run_stage(old, "dedup", progress=False)
    assert "min_doc_words 60 -> 10" in "".join(e.value.__notes__)
