"""Distributed MinHash LSH (dedup_bands -> dedup_buckets -> dedup) removes exactly what the single
in-memory dedup task removes, on the shipped sample corpus and on a synthetic corpus with planted
near-duplicate chains across input parts, at 1, 4 and 14 bucket tasks; its memory per task is one
key range of one band; it resumes from markers and names a corrupt intermediate file."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from megaqwen.data_pipeline import lsh_files as lf
from megaqwen.data_pipeline import stages as st
from megaqwen.data_pipeline.config import load_config
from megaqwen.data_pipeline.executor import load_markers
from megaqwen.data_pipeline.lsh_stages import VERIFY_BLOCK, greedy_walk, removal_records
from megaqwen.data_pipeline.pipeline import run_stage

DIST_STAGES = ("dedup_bands", "dedup_buckets", "dedup")
N_PARTS = 5


def _synthetic(folder: Path, seed: int = 0) -> list[tuple[str, str, str]]:
    """N_PARTS jsonl files; returns the planted chains (a, b, c): b is one word edit from a (est.
    Jaccard ~0.84), c one more edit from b far from the first (a ~ c ~0.70, under 0.75), each in a
    random part. Also exact copies (case, spaces), punctuation-only copies (same signature, other
    exact key), multi-edit variants and distinct documents."""
    rng = random.Random(seed)
    vocab = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))
        for _ in range(3000)
    ]
    parts: list[list[dict]] = [[] for _ in range(N_PARTS)]

    def put(doc_id: str, words: list[str]) -> None:
        parts[rng.randrange(N_PARTS)].append({"id": doc_id, "text": " ".join(words)})

    def edit(words: list[str], at: int) -> list[str]:
        return words[:at] + [rng.choice(vocab)] + words[at + 1 :]

    chains = []
    for i in range(700):
        w = [rng.choice(vocab) for _ in range(rng.randint(40, 80))]
        put(f"doc-{i}", w)
        kind = i % 7
        if kind == 0:  # chain a ~ b ~ c, a !~ c
            b = edit(w, 8)
            put(f"chainb-{i}", b)
            put(f"chainc-{i}", edit(b, len(w) - 9))
            chains.append((f"doc-{i}", f"chainb-{i}", f"chainc-{i}"))
        elif kind == 1:  # exact copies
            for k in range(rng.randint(1, 3)):
                put(f"exact-{i}-{k}", [x.upper() if k % 2 else x for x in w] + [" "] * k)
        elif kind == 2:  # same words, other punctuation: same signature, another exact key
            for k in range(rng.randint(1, 3)):
                put(f"punct-{i}-{k}", [x + ("," if j % (k + 3) == 0 else "") for j, x in enumerate(w)])
        elif kind == 3:  # a cluster of variants, 1-4 edits each
            for k in range(rng.randint(2, 6)):
                v = w
                for _ in range(rng.randint(1, 4)):
                    v = edit(v, rng.randrange(len(v)))
                put(f"var-{i}-{k}", v)
    for t, docs in enumerate(parts):
        rng.shuffle(docs)
        with open(folder / f"part{t}.jsonl", "w") as f:
            f.writelines(json.dumps(d) + "\n" for d in docs)
    return chains


def _cfg(out: Path, inputs: dict, band_tasks: int = 0, **top):
    sets = [f"dedup.band_tasks={band_tasks}"]
    return load_config(
        "sample",
        {"output_dir": str(out), "workers": 1, "steps": [{"name": "normalize"}], **inputs, **top},
        sets=sets,
    )


CORPORA = {
    "sample": lambda folder: ({}, []),
    "synthetic": lambda folder: (
        {"input": {"paths": [str(folder / "part*.jsonl")], "parts_per_file": 1}},
        _synthetic(folder),
    ),
}


@pytest.fixture(scope="module", params=list(CORPORA))
def filtered(request, tmp_path_factory):
    """A corpus run through the filter stage, and the single in-memory dedup task's records."""
    root = tmp_path_factory.mktemp(request.param)
    inputs, chains = CORPORA[request.param](root)
    base = root / "filtered"
    run_stage(_cfg(base, inputs), "filter", progress=False)
    ref = root / "single"
    shutil.copytree(base, ref)
    cfg = _cfg(ref, inputs)
    run_stage(cfg, "dedup", progress=False)
    records = json.loads((ref / "dedup" / "duplicates.json").read_text())
    n_parts = len(list((base / "filtered").glob("*.jsonl.zst")))
    want = {t: records.get(str(t), []) for t in range(n_parts)}
    return {"root": root, "base": base, "inputs": inputs, "want": want, "chains": chains, "ref": ref}


def _run(filtered, name: str, band_tasks: int, bucket_workers: int = 1, **top):
    """The three stages, in-process; `bucket_workers` > 1: dedup_buckets on spawned processes."""
    out = filtered["root"] / name
    shutil.copytree(filtered["base"], out)
    cfg = _cfg(out, filtered["inputs"], band_tasks, min_mb_per_worker=0, **top)
    for s in DIST_STAGES:
        run_stage(cfg, s, workers=bucket_workers if s == "dedup_buckets" else 1, progress=False)
    got = {t: removal_records(cfg, t) for t in filtered["want"]}
    return cfg, got


def _ids(out: Path, t: int) -> list[str]:
    from megaqwen.data_pipeline.io import read_documents

    return [d.id for d in read_documents(out / "filtered" / f"{t:05d}.jsonl.zst")]


def test_greedy_walk_equals_the_sequential_walk_on_random_graphs():
    rng = np.random.default_rng(0)
    for trial in range(30):
        n = int(rng.integers(2, 60))
        m = int(rng.integers(1, 4 * n))
        a, b = rng.integers(0, n, m), rng.integers(0, n, m)
        pairs = np.unique(np.stack([np.minimum(a, b), np.maximum(a, b)], 1)[a != b], axis=0) * 7 + 3
        removed: dict[int, int] = {}  # the single task's loop, on the same graph
        for i in sorted(set(pairs[:, 1].tolist())):
            kept = sorted(j for j in pairs[pairs[:, 1] == i, 0].tolist() if j not in removed)
            if kept:
                removed[i] = kept[0]
        gid, ptr, _ = greedy_walk(pairs)
        assert dict(zip(gid.tolist(), ptr.tolist())) == removed, trial


@pytest.mark.parametrize("band_tasks", [1, 4, 14])
def test_distributed_dedup_removes_what_the_single_task_removes(filtered, band_tasks):
    cfg, got = _run(filtered, f"bt{band_tasks}", band_tasks)
    want = filtered["want"]
    assert sum(map(len, want.values())) >= 20  # the corpus does hold duplicates
    assert got == want  # same documents, same kept document each points at, same kind
    for t, recs in want.items():  # what judge / annotate drop as they read each part
        assert st._duplicates(cfg, t) == {pos for pos, _, _ in recs}
    m = load_markers(cfg.out, "dedup")[0]
    near = np.concatenate([np.load(lf.pairs_path(cfg.out, t))["near"] for t in range(band_tasks)])
    assert len(np.unique(near, axis=0)) == len(near)  # each pair leaves one bucket task (its lowest band)
    single = load_markers(filtered["ref"], "dedup")[0]
    assert m["steps"] == single["steps"] and m["removed"] == single["removed"]
    if filtered["chains"]:
        # a ~ b ~ c, a !~ c: the single task keeps a and c (greedy, not connected components); the
        # test corpus must hold such cases for the equality above to mean anything
        ids = {t: _ids(cfg.out, t) for t in want}
        removed = {ids[t][pos] for t, recs in got.items() for pos, _, _ in recs}
        assert (
            sum(a not in removed and b in removed and c not in removed for a, b, c in filtered["chains"])
            >= 10
        )
        assert m["pairs"]["alias"] > 0 and m["pairs"]["exact"] > 0


def test_bucket_memory_is_a_band_key_range_not_the_corpus(filtered):
    if not filtered["chains"]:
        pytest.skip("measured on the synthetic corpus (the sample corpus is too small to split)")
    n_docs = load_markers(filtered["ref"], "dedup")[0]["documents"]
    merge_peak, loaded = {}, {}
    for k in (1, 4, 14):
        out = filtered["root"] / f"bt{k}"
        if not out.exists():
            _run(filtered, f"bt{k}", k)
        ms = load_markers(out, "dedup_buckets")
        merge_peak[k] = max(m["merge_peak_bytes"] for m in ms)
        loaded[k] = max(m["loaded_bytes"] for m in ms)
        # candidate checks read 2 signature rows per pair, in blocks: bounded whatever the corpus
        assert max(m["verify_peak_bytes"] for m in ms) <= 2 * VERIFY_BLOCK * 112 * 8 + 16 * n_docs
    assert loaded[1] > loaded[4] > loaded[14]  # each task merges a shrinking share of the bands
    # one band at a time: 24 B per document (x2 while sorting) plus its pairs, where the single task
    # holds 112 x 8 B of signature per document and its LSH index
    assert max(merge_peak.values()) < n_docs * 24 * 2 * 1.5 < n_docs * 112 * 8 / 5
    # a band bigger than bucket_chunk_docs is merged in key ranges, and key_splits spreads each band
    # over several tasks: less memory, same result
    dedup = {**_dedup_dict(filtered), "bucket_chunk_docs": 300, "key_splits": 2}
    cfg, got = _run(filtered, "chunked", 4, dedup=dedup)
    chunked = load_markers(cfg.out, "dedup_buckets")
    assert got == filtered["want"]
    assert len(chunked) == 8 and max(m["chunks"] for m in chunked) > 4
    assert max(m["merge_peak_bytes"] for m in chunked) < merge_peak[4] / 3


def _dedup_dict(filtered) -> dict:
    import dataclasses

    return dataclasses.asdict(_cfg(filtered["base"], filtered["inputs"]).dedup)


@pytest.mark.distributed  # spawns 2 worker processes
def test_local_worker_processes_resume_and_corrupt_file(filtered):
    if not filtered["chains"]:
        pytest.skip("run once, on the synthetic corpus")
    cfg, got = _run(filtered, "workers", 4, bucket_workers=2)
    assert got == filtered["want"]
    # a lost task (its marker and output gone, as after a kill) is the only one a rerun runs
    (cfg.out / "markers" / "dedup_buckets" / "00002.json").unlink()
    lf.pairs_path(cfg.out, 2).unlink()
    assert run_stage(cfg, "dedup_buckets", progress=False) == [2]
    assert run_stage(cfg, "dedup_bands", progress=False) == []
    # a truncated intermediate file is named
    bad = lf.band_path(cfg.out, "b03", 1)
    bad.write_bytes(bad.read_bytes()[:100])
    (cfg.out / "markers" / "dedup_buckets" / "00001.json").unlink()
    with pytest.raises(lf.CorruptFile, match=str(bad)):
        run_stage(cfg, "dedup_buckets", progress=False)


def test_slurm_script_submits_the_distributed_stages(tmp_path):
    import os
    import subprocess
    import sys

    import yaml

    root = Path(__file__).resolve().parents[2]
    data = yaml.safe_load((root / "data_pipeline/configs/pipeline_sample.yaml").read_text())
    data["input"]["paths"] = [str(root / "data_pipeline/samples/corpus.jsonl")]
    data["dedup"]["band_tasks"] = 4
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(data))
    log = tmp_path / "sbatch.log"
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text(f'#!/usr/bin/env bash\necho "$@" >> {log}\necho $((1000 + $(wc -l < {log})))\n')
    fake.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{fake.parent}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "LOG_DIR": str(tmp_path / "logs"),
        "DATA_PIPELINE_STAGES": "filter dedup_bands dedup_buckets dedup",
    }
    out = subprocess.run(
        ["bash", str(root / "launch/slurm_data_pipeline.sh"), str(cfg), "8"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    calls = log.read_text().splitlines()
    arrays = [(c.split("--stage ")[1].split()[0], c.split("--array=")[1].split()[0]) for c in calls]
    assert arrays == [("filter", "0-7"), ("dedup_bands", "0-7"), ("dedup_buckets", "0-3"), ("dedup", "0-0")]


@pytest.mark.parametrize("mode", [["dedup.minhash=false"], ["dedup.exact=false"]])
def test_exact_only_and_minhash_only(tmp_path, mode):
    over = {"output_dir": str(tmp_path / "single"), "workers": 1, "steps": [{"name": "normalize"}]}
    single = load_config("sample", over, sets=mode)
    run_stage(single, "filter", progress=False)
    shutil.copytree(single.out, tmp_path / "dist")
    run_stage(single, "dedup", progress=False)
    want = json.loads((single.out / "dedup" / "duplicates.json").read_text())
    dist = load_config(
        "sample", {**over, "output_dir": str(tmp_path / "dist")}, sets=mode + ["dedup.band_tasks=3"]
    )
    for s in DIST_STAGES:
        run_stage(dist, s, progress=False)
    got = {str(t): removal_records(dist, t) for t in range(4)}
    assert want and {t: v for t, v in got.items() if v} == want


def test_a_task_killed_before_its_rename_reruns_alone(filtered, monkeypatch):
    if filtered["chains"]:
        pytest.skip("run once, on the sample corpus")
    out = filtered["root"] / "killed"
    shutil.copytree(filtered["base"], out)
    cfg = _cfg(out, filtered["inputs"], 4)
    run_stage(cfg, "dedup_bands", progress=False)
    real = lf.os.replace

    def dies_on_task_2(src, dst):  # the process dies after writing its pairs, before the rename
        if Path(dst) == lf.pairs_path(out, 2):
            raise KeyboardInterrupt("killed")
        real(src, dst)

    monkeypatch.setattr(lf.os, "replace", dies_on_task_2)
    with pytest.raises(KeyboardInterrupt):
        run_stage(cfg, "dedup_buckets", progress=False)
    monkeypatch.setattr(lf.os, "replace", real)
    assert not lf.pairs_path(out, 2).exists() and Path(str(lf.pairs_path(out, 2)) + ".tmp.npz").exists()
    assert run_stage(cfg, "dedup_buckets", progress=False) == [2, 3]  # 0 and 1 kept their markers
    run_stage(cfg, "dedup", progress=False)
    assert {t: removal_records(cfg, t) for t in filtered["want"]} == filtered["want"]
