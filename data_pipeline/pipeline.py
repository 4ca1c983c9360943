"""The stages in order, each a set of resumable tasks; `run_stage` is what a SLURM array task calls."""

from __future__ import annotations

import functools
import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from megaqwen.data_pipeline import stages as st
from megaqwen.data_pipeline.config import PipelineConfig
from megaqwen.data_pipeline.document import StepStats
from megaqwen.data_pipeline.domain_student import train_domains_task
from megaqwen.data_pipeline.executor import load_markers, require_complete, run_tasks

log = logging.getLogger("megaqwen.data_pipeline")

# stages whose markers hold per-step kept/removed stats, summed into stats.json["steps"]
SUMMARY_STAGES = ("filter", "dedup", "annotate", "shards")
STAGES = ["filter", "dedup", "judge", "train_scorer", "train_domains", "annotate", "shards", "recipes",
          "report"]


def _domains_with_data(cfg: PipelineConfig) -> list[str]:
    root = cfg.out / "annotated"
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def shards_task(cfg: PipelineConfig, task: int) -> dict[str, Any]:
    """Tokenise one domain's annotated documents into `shards/<domain>.bin/.idx`."""
    from megaqwen.data.tokenize import tokenize_files

    domain = _domains_with_data(cfg)[task]
    files = sorted((cfg.out / "annotated" / domain).glob("*.jsonl.zst"))
    stats = tokenize_files(
        files, str(cfg.out / "shards" / domain), log_every_s=60.0, tokenizer=cfg.remix.tokenizer
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
        "documents": stats.documents,
        "tokens": stats.tokens,
        "steps": [step.to_json()],
    }


def recipes_task(cfg: PipelineConfig, task: int) -> dict[str, Any]:
    from megaqwen.data_pipeline.remix import plan_stage, write_recipe

    tokens = {m["domain"]: m["tokens"] for m in load_markers(cfg.out, "shards")}
    prefixes = {d: f"../shards/{d}" for d in tokens}
    plans = {}
    for stage in cfg.remix.stages:
        plan = plan_stage(tokens, stage)
        write_recipe(cfg.out / "recipes" / f"{stage.name}.json", stage, plan, prefixes, tokens)
        plans[stage.name] = plan
    return {"task": task, "domain_tokens": tokens, "plans": plans}


def report_task(cfg: PipelineConfig, task: int) -> dict[str, Any]:
    from megaqwen.data_pipeline.report import write_report

    return {"task": task, **write_report(cfg)}


def n_tasks(cfg: PipelineConfig, stage: str) -> int:
    if stage in ("filter", "judge", "annotate"):
        return st.n_input_tasks(cfg)
    if stage == "shards":
        require_complete(cfg.out, "annotate", st.n_input_tasks(cfg))
        return len(_domains_with_data(cfg))
    return 1


def describe_task(cfg: PipelineConfig, stage: str, task: int) -> str:
    """What a task works on, for error messages: its input part, or its domain."""
    if stage in ("filter", "judge", "annotate"):
        parts = st.expand_inputs(cfg.input.paths, cfg.input.parts_per_file)
        return f"input {parts[task].name}" if task < len(parts) else f"task {task}"
    if stage == "shards":
        doms = _domains_with_data(cfg)
        return f"domain {doms[task]!r}" if task < len(doms) else f"task {task}"
    return f"task {task}"


def stage_fn(stage: str) -> Callable[[PipelineConfig, int], dict[str, Any]]:
    return {
        "filter": st.filter_task,
        "dedup": st.dedup_task,
        "judge": st.judge_task,
        "train_scorer": st.train_scorer_task,
        "train_domains": train_domains_task,
        "annotate": st.annotate_task,
        "shards": shards_task,
        "recipes": recipes_task,
        "report": report_task,
    }[stage]


def enabled_stages(cfg: PipelineConfig) -> list[str]:
    skip = {"judge", "train_scorer"} if cfg.judge.backend == "none" else set()
    if not (cfg.domains.backend == "embedding" and cfg.domains.student):
        skip.add("train_domains")
    return [s for s in STAGES if s not in skip]


def run_stage(
    cfg: PipelineConfig,
    stage: str,
    rank: int = 0,
    world: int = 1,
    workers: int | None = None,
    progress: bool = True,
) -> list[int]:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {STAGES}")
    cfg.out.mkdir(parents=True, exist_ok=True)
    # record the resolved config once, beside the outputs (machine-readable record of the run)
    cfg_path = cfg.out / "pipeline_config.json"
    if not cfg_path.exists():
        cfg_path.write_text(json.dumps(asdict(cfg), indent=1))
    n = n_tasks(cfg, stage)
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
    )
    log.info("%s: ran %d task(s) of %d", stage, len(ran), n)
    return ran


def run_pipeline(
    cfg: PipelineConfig, stages: list[str] | None = None, progress: bool = True
) -> dict[str, list[int]]:
    """All (or the named) enabled stages in order, locally; returns the tasks each stage ran."""
    todo = stages or enabled_stages(cfg)
    return {s: run_stage(cfg, s, progress=progress) for s in todo}


def summary(cfg: PipelineConfig) -> dict[str, Any]:
    """Merged per-step stats of the filter, dedup and annotate stages."""
    from megaqwen.data_pipeline.document import merge_stats

    out: dict[str, Any] = {}
    for stage in SUMMARY_STAGES:
        out[stage] = merge_stats([m["steps"] for m in load_markers(cfg.out, stage) if "steps" in m])
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
