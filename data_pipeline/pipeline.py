"""The stages in order, each a set of resumable tasks; `run_stage` is what a SLURM array task calls.

A stage whose markers were written under another config (`fingerprint.py`: the keys it and the
stages before it read) is refused, naming the changed keys, unless `rerun` is set: then its stale
markers are dropped and its tasks run again, as do the stages after it, while stages whose keys did
not change keep their results. Old and new results are never mixed.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from megaqwen.data_pipeline import lsh_stages as lsh
from megaqwen.data_pipeline import stages as st
from megaqwen.data_pipeline.config import PipelineConfig
from megaqwen.data_pipeline.document import StepStats
from megaqwen.data_pipeline.domain_student import train_domains_task
from megaqwen.data_pipeline.executor import (
    load_markers,
    marker_fingerprints,
    remove_markers,
    require_complete,
    run_tasks,
)
from megaqwen.data_pipeline.fingerprint import ancestors, changes, stage_records, write_record
from megaqwen.data_pipeline.slug import domain_slugs
from megaqwen.data_pipeline.synthesize import synthesize_task

log = logging.getLogger("megaqwen.data_pipeline")

# stages whose markers hold per-step kept/removed stats, summed into stats.json["steps"]
SUMMARY_STAGES = ("filter", "dedup", "annotate", "shards")
STAGES = ["filter", "dedup_bands", "dedup_buckets", "dedup", "judge", "train_scorer", "train_domains",
          "synthesize", "annotate", "shards", "recipes", "report"]


def _domains_with_data(cfg: PipelineConfig) -> list[str]:
    """Slugs of the domain folders under annotated/ that hold documents."""
    root = cfg.out / "annotated"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.jsonl.zst")))


def shards_task(cfg: PipelineConfig, task: int) -> dict[str, Any]:
    """Tokenise one domain's annotated documents into `shards/<domain slug>.bin/.idx`."""
    from megaqwen.data.tokenize import tokenize_files

    shard = _domains_with_data(cfg)[task]
    domain = {s: d for d, s in domain_slugs(cfg.domains.taxonomy).items()}.get(shard, shard)
    files = sorted((cfg.out / "annotated" / shard).glob("*.jsonl.zst"))
    stats = tokenize_files(
        files, str(cfg.out / "shards" / shard), log_every_s=60.0, tokenizer=cfg.remix.tokenizer
    )
    # as a step: documents in, documents written to the shard, and why any were not
    step = StepStats(
        "shards", seen=stats.documents + stats.empty + stats.malformed + stats.failed, kept=stats.documents
    )
    for reason, n in (
        ("shards:empty_text", stats.empty),
        ("shards:malformed", stats.malformed),
        ("shards:tokenizer_failed", stats.failed),
    ):
        for _ in range(n):
            step.remove(reason)
    return {
        "task": task,
        "domain": domain,
        "shard": shard,
        "documents": stats.documents,
        "tokens": stats.tokens,
        "steps": [step.to_json()],
    }


def recipes_task(cfg: PipelineConfig, task: int) -> dict[str, Any]:
    from megaqwen.data_pipeline.remix import plan_stage, write_recipe

    shards = load_markers(cfg.out, "shards")
    tokens = {m["domain"]: m["tokens"] for m in shards}
    prefixes = {m["domain"]: f"../shards/{m['shard']}" for m in shards}
    plans = {}
    for stage in cfg.remix.stages:
        plan = plan_stage(tokens, stage)
        write_recipe(cfg.out / "recipes" / f"{stage.name}.json", stage, plan, prefixes, tokens)
        plans[stage.name] = plan
    keep = {f"{n}{ext}" for n in plans for ext in (".json", ".meta.json")}
    for old in (cfg.out / "recipes").glob("*.json"):  # recipes of stages no longer configured
        if old.name not in keep:
            old.unlink()
    return {"task": task, "domain_tokens": tokens, "plans": plans}


def report_task(cfg: PipelineConfig, task: int) -> dict[str, Any]:
    from megaqwen.data_pipeline.report import write_report

    return {"task": task, **write_report(cfg)}


def n_tasks(cfg: PipelineConfig, stage: str) -> int:
    if stage in ("filter", "dedup_bands", "judge", "synthesize", "annotate"):
        return st.n_input_tasks(cfg)
    if stage == "dedup_buckets":
        return cfg.dedup.band_tasks * cfg.dedup.key_splits
    if stage == "shards":
        require_complete(cfg.out, "annotate", st.n_input_tasks(cfg))
        return len(_domains_with_data(cfg))
    return 1


def describe_task(cfg: PipelineConfig, stage: str, task: int) -> str:
    """What a task works on, for error messages: its input part, or its domain."""
    if stage in ("filter", "dedup_bands", "judge", "synthesize", "annotate"):
        parts = st.expand_inputs(cfg.input.paths, cfg.input.parts_per_file)
        return f"input {parts[task].name}" if task < len(parts) else f"task {task}"
    if stage == "shards":
        doms = _domains_with_data(cfg)
        return f"domain {doms[task]!r}" if task < len(doms) else f"task {task}"
    if stage == "dedup_buckets" and task < n_tasks(cfg, stage):
        ks = cfg.dedup.key_splits
        units = lsh.lf.units_of_task(lsh.all_units(cfg), cfg.dedup.band_tasks, task // ks)
        return f"LSH units {units}, key range {task % ks + 1}/{ks}"
    return f"task {task}"


def stage_fn(stage: str) -> Callable[[PipelineConfig, int], dict[str, Any]]:
    return {
        "filter": st.filter_task,
        "dedup_bands": lsh.bands_task,
        "dedup_buckets": lsh.buckets_task,
        "dedup": st.dedup_task,
        "judge": st.judge_task,
        "train_scorer": st.train_scorer_task,
        "train_domains": train_domains_task,
        "synthesize": synthesize_task,
        "annotate": st.annotate_task,
        "shards": shards_task,
        "recipes": recipes_task,
        "report": report_task,
    }[stage]


def enabled_stages(cfg: PipelineConfig) -> list[str]:
    skip = {"judge", "train_scorer"} if cfg.judge.backend == "none" else set()
    if cfg.dedup.band_tasks == 0:
        skip |= {"dedup_bands", "dedup_buckets"}
    if not (cfg.domains.backend == "embedding" and cfg.domains.student):
        skip.add("train_domains")
    if not cfg.synthesize.enabled:
        skip.add("synthesize")
    return [s for s in STAGES if s not in skip]


def run_stage(
    cfg: PipelineConfig,
    stage: str,
    rank: int = 0,
    world: int = 1,
    workers: int | None = None,
    progress: bool = True,
    rerun: bool = False,
    records: dict[str, dict[str, Any]] | None = None,
) -> list[int]:
    """Run this rank's unfinished tasks of `stage`; `rerun`: redo results made under another config
    (without it such results are refused). `records`: `fingerprint.stage_records` (computed if None)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {STAGES}")
    enabled = enabled_stages(cfg)
    records = records or stage_records(cfg, [s for s in STAGES if s in enabled or s == stage])
    for up in ancestors(stage, enabled):
        _require_current(cfg, up, records[up])
    n = n_tasks(cfg, stage)
    rec = records[stage]
    stale = {t for t, fp in marker_fingerprints(cfg.out, stage).items() if fp != rec["fingerprint"]}
    if stale:
        why = changes(cfg.out, stage, rec)
        if not rerun:
            raise ValueError(_refusal(cfg, {stage: why}))
        log.info("%s: re-running: its results in %s were made with another config (%s)", stage, cfg.out, why)
        # this rank drops its own stale markers, rank 0 also those of tasks that no longer exist
        remove_markers(cfg.out, stage, {t for t in stale if (t % world == rank if t < n else rank == 0)})
        if rank == 0:
            _prune_outputs(cfg, stage, n)
    cfg.out.mkdir(parents=True, exist_ok=True)
    write_record(cfg.out, stage, rec)
    # the resolved config beside the outputs (machine-readable record of the latest run)
    _atomic_text(cfg.out / "pipeline_config.json", json.dumps(asdict(cfg), indent=1))
    total = st.input_bytes(cfg) if stage == "filter" else None
    fn = functools.partial(stage_fn(stage), cfg)
    procs = workers if workers is not None else cfg.workers
    if cfg.executor.kind == "local" and cfg.min_mb_per_worker > 0 and procs > 1:
        by_size = max(1, int(st.input_bytes(cfg) / (cfg.min_mb_per_worker * 1e6)))
        if by_size < procs:
            log.info("%s: %d worker process(es), not %d: the input is under %.0f MB per worker",
                     stage, by_size, procs, cfg.min_mb_per_worker)
            procs = by_size
    ran = run_tasks(
        stage,
        n,
        fn,
        cfg.out,
        procs,
        rank,
        world,
        total_bytes=total,
        progress=progress,
        executor=cfg.executor.kind,
        ray_address=cfg.executor.ray_address,
        describe=functools.partial(describe_task, cfg, stage),
        fingerprint=rec["fingerprint"],
    )
    log.info("%s: ran %d task(s) of %d", stage, len(ran), n)
    return ran


def run_pipeline(
    cfg: PipelineConfig, stages: list[str] | None = None, progress: bool = True, rerun: bool = False
) -> dict[str, list[int]]:
    """All (or the named) enabled stages in order, locally; returns the tasks each stage ran.

    Before any work: results made under another config are refused (naming the changed keys), or
    with `rerun` re-run stage by stage from the first one affected."""
    todo = stages or enabled_stages(cfg)
    enabled = set(enabled_stages(cfg)) | set(todo)
    records = stage_records(cfg, [s for s in STAGES if s in enabled])
    stale = stale_stages(cfg, todo, records)
    if stale and not rerun:
        raise ValueError(_refusal(cfg, stale))
    return {s: run_stage(cfg, s, progress=progress, rerun=rerun, records=records) for s in todo}


def stale_stages(
    cfg: PipelineConfig, stages: list[str], records: dict[str, dict[str, Any]]
) -> dict[str, str]:
    """`{stage: what changed}` for the stages holding markers written under another config."""
    out = {}
    for s in stages:
        if any(fp != records[s]["fingerprint"] for fp in marker_fingerprints(cfg.out, s).values()):
            out[s] = changes(cfg.out, s, records[s])
    return out


def _refusal(cfg: PipelineConfig, stale: dict[str, str]) -> str:
    first = next(iter(stale))
    return (
        f"{cfg.out} holds results made with another config (stage {first}: {stale[first]}); "
        f"stages {', '.join(stale)} would re-run: pass --rerun to re-run them (their old results are "
        f"replaced), or choose another output_dir"
    )


def _require_current(cfg: PipelineConfig, stage: str, record: dict[str, Any]) -> None:
    """The results of `stage` are complete and were made under this config."""
    try:
        require_complete(cfg.out, stage, n_tasks(cfg, stage), record["fingerprint"])
    except RuntimeError as e:
        fps = marker_fingerprints(cfg.out, stage).values()
        if any(fp != record["fingerprint"] for fp in fps):
            e.add_note(f"{stage} was run with another config ({changes(cfg.out, stage, record)}): "
                       f"run it again with --rerun")
        raise


def _prune_outputs(cfg: PipelineConfig, stage: str, n: int) -> None:
    """Outputs a re-run would not overwrite: files of tasks that no longer exist, shards of domains
    that no longer have documents."""
    if stage == "annotate":
        for p in cfg.out.glob("annotated/*/*.jsonl.zst"):
            if int(p.name[:5]) >= n:
                p.unlink()
    if stage == "shards":
        keep = set(_domains_with_data(cfg))
        for p in cfg.out.glob("shards/*"):
            if p.name.split(".")[0] not in keep:
                p.unlink()


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")  # unique across nodes sharing the folder
    tmp.write_text(text)
    os.replace(tmp, path)


def summary(cfg: PipelineConfig) -> dict[str, Any]:
    """Merged per-step stats of the filter, dedup and annotate stages."""
    from megaqwen.data_pipeline.document import merge_stats

    out: dict[str, Any] = {}
    for stage in SUMMARY_STAGES:
        out[stage] = merge_stats([m["steps"] for m in load_markers(cfg.out, stage) if "steps" in m])
    synthesized = [m["steps"] for m in load_markers(cfg.out, "synthesize") if "steps" in m]
    if synthesized:  # generations kept / removed (score, duplicates), as the report's removal reasons
        out["synthesize"] = merge_stats(synthesized)
    judged = load_markers(cfg.out, "judge")
    if judged:  # the judge labels a sample and removes nothing: how many, of how many candidates
        out["judge"] = {
            "labelled": sum(m["judged"] for m in judged),
            "candidates": sum(m.get("candidates", 0) for m in judged),
        }
    domain_docs: Counter = Counter()
    for m in load_markers(cfg.out, "annotate"):
        domain_docs.update(m.get("domain_docs", {}))
    out["domain_docs"] = dict(domain_docs)
    return out
