"""What each stage's results depend on, so a rerun with a changed config never mixes old and new.

A stage's config record is the flattened config keys it reads plus those of every enabled stage
upstream of it (so changing a filter threshold changes the record of filter and of everything after
it, and not of a stage before it). Its fingerprint (a hash of the record) goes into every task
marker the stage writes; `markers/<stage>.config/<fingerprint>.json` keeps the record itself, so a
stale stage can be explained by the keys that changed. Keys are named as `key=value` overrides name them
(`steps.route.prose.gopher_quality.min_doc_words`); step parameters are recorded with their defaults,
so writing a default out changes nothing.

Performance knobs are not part of any record: workers, executor, min_mb_per_worker, batch sizes,
threads, timeouts, the LSH storage backend, dedup.bucket_chunk_docs, and output_dir itself (a copied
folder stays valid).
The input files' sizes and modification times are (a rewritten corpus re-runs everything).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
import uuid
from pathlib import Path
from typing import Any

from megaqwen.data_pipeline.config import PipelineConfig

_SCORER = ("scorer.encoder", "scorer.max_length", "scorer.encoder_kind")
# own keys of each stage (prefixes of flattened keys); `_own_keys` adds the conditional ones
OWN_KEYS: dict[str, tuple[str, ...]] = {
    "filter": ("input.paths", "input.files", "input.text_key", "input.id_key", "input.parts_per_file",
               "keep_removed", "steps", "dedup.exact", "dedup.minhash", "dedup.ngram", "dedup.num_bands",
               "dedup.rows_per_band", "dedup.seed"),
    "dedup_bands": (),
    "dedup_buckets": ("dedup.threshold", "dedup.band_tasks", "dedup.key_splits"),
    "dedup": ("dedup.threshold", "dedup.band_tasks", "dedup.key_splits"),
    "judge": ("judge.backend", "judge.model", "judge.base_url", "judge.mode", "judge.top_logprobs",
              "judge.tokenizer", "judge.device", "judge.dtype", "judge.max_doc_chars", "judge.sample_size",
              "judge.dimensions", "domains.backend"),
    "train_scorer": _SCORER + ("scorer.heldout_fraction", "scorer.ridge_alpha", "scorer.seed",
                               "domains.backend"),
    "train_domains": ("domains", "scorer.encoder", "scorer.max_length", "scorer.heldout_fraction",
                      "scorer.seed"),
    "synthesize": ("synthesize", "judge", "dedup.threshold"),
    "annotate": ("domains", "judge.backend", "remix.tokenizer", "remix.synthetic_max_share",
                 "remix.synthetic_max_share_by_domain", "synthesize.enabled") + _SCORER,
    "shards": ("remix.tokenizer",),
    "recipes": ("remix.stages",),
    "report": (),
}
# stages whose results a stage reads (only the enabled ones count)
UPSTREAM: dict[str, tuple[str, ...]] = {
    "filter": (),
    "dedup_bands": ("filter",),
    "dedup_buckets": ("dedup_bands",),
    "dedup": ("filter", "dedup_buckets"),
    "judge": ("dedup",),
    "train_scorer": ("judge",),
    "train_domains": ("dedup",),
    "synthesize": ("dedup",),
    "annotate": ("dedup", "train_scorer", "train_domains", "synthesize"),
    "shards": ("annotate",),
    "recipes": ("shards",),
    "report": ("recipes",),
}


def _own_keys(cfg: PipelineConfig, stage: str) -> tuple[str, ...]:
    keys = OWN_KEYS[stage]
    uses_judge_domains = cfg.domains.backend in ("judge", "distilled")
    if stage in ("judge", "train_scorer") and uses_judge_domains:
        keys += ("domains.taxonomy",)
    if stage == "annotate" and cfg.judge.backend != "none":
        keys += ("quality",)
    return keys


def upstream(stage: str, enabled: list[str]) -> list[str]:
    return [s for s in UPSTREAM[stage] if s in enabled]


def ancestors(stage: str, enabled: list[str]) -> list[str]:
    """Every enabled stage whose results `stage` depends on, directly or not, in pipeline order (a
    stage may read any of them: annotate reads the filter's files, report reads every stage's)."""
    seen: set[str] = set()
    todo = upstream(stage, enabled)
    while todo:
        s = todo.pop()
        if s not in seen:
            seen.add(s)
            todo += upstream(s, enabled)
    return [s for s in enabled if s in seen]


def _label(items: list[Any], i: int) -> str:
    """A list entry's name in keys: its `name` when unique in the list, else its position."""
    names = [it.get("name") if isinstance(it, dict) else None for it in items]
    return str(names[i]) if names[i] is not None and names.count(names[i]) == 1 else str(i)


def _full_steps(specs: list[Any], where: str = "steps") -> list[Any]:
    """Step entries with every parameter (defaults filled in), recursively for routed sub-steps."""
    from megaqwen.data_pipeline.config_util import from_dict
    from megaqwen.data_pipeline.steps.base import step_types

    types_ = step_types()
    out = []
    for i, spec in enumerate(specs):
        cls = types_.get(spec.get("name")) if isinstance(spec, dict) else None
        if cls is None:
            out.append(spec)  # build_steps refuses it with its own message when the stage runs
            continue
        here = f"{where}[{i}] ({spec['name']})"
        given = {k: v for k, v in spec.items() if k != "name"}
        params = dataclasses.asdict(from_dict(cls.Config, given, here))
        for name, tp in typing.get_type_hints(cls.Config).items():
            if tp == list[dict[str, Any]]:
                params[name] = _full_steps(params[name], f"{here}.{name}")
        out.append({"name": spec["name"], **params})
    return out


def _flatten(value: Any, prefix: str, out: dict[str, Any], entry: bool = False) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            if not (entry and k == "name"):  # a list entry's name is in its key already
                _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, v in enumerate(value):
            label = _label(value, i)
            _flatten(v, f"{prefix}.{label}", out, entry=label == v.get("name"))
    else:
        out[prefix] = value


def flat_config(cfg: PipelineConfig) -> dict[str, Any]:
    """The config as `{dotted key: value}`, steps with their defaults, plus `input.files`."""
    data = dataclasses.asdict(cfg)
    data["steps"] = _full_steps(data["steps"])
    flat: dict[str, Any] = {}
    _flatten(data, "", flat)
    from megaqwen.data_pipeline.io import expand_inputs

    paths = sorted({p.path for p in expand_inputs(cfg.input.paths, cfg.input.parts_per_file)})
    flat["input.files"] = [[p, os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in paths]
    return flat


def _selected(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def stage_records(cfg: PipelineConfig, enabled: list[str]) -> dict[str, dict[str, Any]]:
    """`{stage: {"fingerprint": hash, "config": {key: value}}}` for every enabled stage."""
    flat = flat_config(cfg)
    keys: dict[str, set[str]] = {}
    for stage in enabled:  # in pipeline order: upstream stages come first
        own = {k for k in flat if _selected(k, _own_keys(cfg, stage))}
        keys[stage] = own.union(*(keys[u] for u in upstream(stage, enabled)))
    out = {}
    for stage in enabled:
        record = {k: flat[k] for k in sorted(keys[stage])}
        blob = json.dumps(record, sort_keys=True, default=str).encode()
        out[stage] = {"fingerprint": hashlib.sha256(blob).hexdigest()[:16], "config": record}
    return out


def record_path(out_dir: Path, stage: str, fingerprint: str) -> Path:
    return out_dir / "markers" / f"{stage}.config" / f"{fingerprint}.json"


def write_record(out_dir: Path, stage: str, record: dict[str, Any]) -> None:
    p = record_path(out_dir, stage, record["fingerprint"])
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + f".{uuid.uuid4().hex}.tmp")  # unique across SLURM nodes sharing the folder
    tmp.write_text(json.dumps(record, indent=1, default=str))
    os.replace(tmp, p)


def _short(v: Any) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 40 else s[:37] + "..."


def changes(out_dir: Path, stage: str, record: dict[str, Any]) -> str:
    """What differs between `record` and the config the stage's other markers were written with."""
    from collections import Counter

    from megaqwen.data_pipeline.executor import marker_fingerprints

    stale = Counter(fp for fp in marker_fingerprints(out_dir, stage).values() if fp != record["fingerprint"])
    if not stale:
        return "no stale markers"
    fp = stale.most_common(1)[0][0]
    p = record_path(out_dir, stage, fp) if fp else None
    if p is None or not p.is_file():
        return "its markers carry no config record (written before config records existed)"
    old = json.loads(p.read_text())["config"]
    new = json.loads(json.dumps(record["config"], default=str))
    diff = [
        f"{k} {_short(old.get(k, '<unset>'))} -> {_short(new.get(k, '<unset>'))}"
        for k in sorted(set(old) | set(new))
        if old.get(k, "<unset>") != new.get(k, "<unset>")
    ]
    more = f" and {len(diff) - 6} more" if len(diff) > 6 else ""
    return "changed: " + ", ".join(diff[:6]) + more
