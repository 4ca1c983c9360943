"""The pipeline's stages as task functions: filter -> dedup -> judge -> train_scorer -> annotate.

Layout under `output_dir`:
    filtered/<task>.jsonl.zst      documents that passed the per-document steps
    removed/<task>.jsonl.zst       removed documents with `metadata.removed_by` (keep_removed)
    signatures/<task>.npz          exact keys + MinHash signatures of the filtered documents
    dedup/duplicates.json          {task: [positions in filtered/<task>]} to drop, with what they duplicate
                                   (dedup.band_tasks > 0: dedup/duplicates/<task>.json, and the
                                   intermediate files of lsh_stages.py under dedup_lsh/)
    judge/<task>.jsonl             judge labels of a sample (text, per-dimension scores, domain probs)
    scorer/                        distilled heads (quality.npz, domain.npz) and agreement metrics
    annotated/<domain slug>/<task>.jsonl.zst   deduplicated, scored, domain-labelled documents
                                   (folder names are `slug.slug(domain)`: `social media` -> social-media)
    markers/<stage>/<task>.json    completion markers holding each task's stats and config fingerprint
    markers/<stage>.config/<fp>.json   the config keys behind fingerprint fp (fingerprint.py)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from megaqwen.data.tokenize import text_tokenizer
from megaqwen.data_pipeline.config import PipelineConfig
from megaqwen.data_pipeline.document import StepStats
from megaqwen.data_pipeline.executor import load_markers, report_progress, require_complete
from megaqwen.data_pipeline.io import Reader, expand_inputs, open_writer, read_documents, write_lines
from megaqwen.data_pipeline.slug import domain_slugs, slug
from megaqwen.data_pipeline.steps import build_steps
from megaqwen.data_pipeline.steps.dedup import Signer, exact_key, find_duplicates

log = logging.getLogger("megaqwen.data_pipeline")
PROGRESS_EVERY = 200  # documents between progress reports


def n_input_tasks(cfg: PipelineConfig) -> int:
    return len(expand_inputs(cfg.input.paths, cfg.input.parts_per_file))


def input_bytes(cfg: PipelineConfig) -> int:
    return sum(p.nbytes for p in expand_inputs(cfg.input.paths, cfg.input.parts_per_file))


# A process runs many tasks of a stage (local workers, or one SLURM rank's share): the judge model and
# the tokenizer are loaded once per process, not once per task (a Qwen tokenizer takes ~1 s, a judge
# model far longer).
@functools.lru_cache(maxsize=1)
def _judge_for(judge_json: str):
    from megaqwen.data_pipeline.config import JudgeConfig
    from megaqwen.data_pipeline.judge.judge import Judge, build_backend

    jc = JudgeConfig(**json.loads(judge_json))
    return Judge(build_backend(jc), jc.dimensions, jc.max_doc_chars)


def get_judge(cfg: PipelineConfig):
    return _judge_for(json.dumps(dataclasses.asdict(cfg.judge), sort_keys=True))


def _atomic_npz(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _atomic_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


# ---------------------------------------------------------------- filter (one task per input part)
MAX_ERRORS_LOGGED = 20  # per task; the rest are counted


def filter_task(cfg: PipelineConfig, task: int) -> dict[str, Any]:
    """Read one input part, run the per-document steps, write kept (and removed) documents.

    A document on which a step raises is removed, counted under `errors` as `<step>:error_<Type>`
    and logged with its file, line and id; it never ends the task.
    """
    part = expand_inputs(cfg.input.paths, cfg.input.parts_per_file)[task]
    out = cfg.out
    reader = Reader(cfg.input.text_key, cfg.input.id_key)
    steps = build_steps(cfg.steps)
    errors = StepStats("errors")
    signer = Signer(cfg.dedup) if cfg.dedup.minhash else None
    exact, sigs = [], []
    removed_path = out / "removed" / f"{task:05d}.jsonl.zst"
    removed_f = open_writer(removed_path.with_name(removed_path.name + ".tmp")) if cfg.keep_removed else None
    last_bytes = 0

    def failed(doc, where: str, e: Exception) -> None:
        errors.seen += 1
        errors.remove(f"{where}:error_{type(e).__name__}")
        if errors.removed <= MAX_ERRORS_LOGGED:
            log.warning("%s (id %s): %s failed, document removed: %s: %s", doc.source, doc.id, where,
                        type(e).__name__, e)

    def kept_docs():
        nonlocal last_bytes
        for n, doc in enumerate(reader.read(part), start=1):
            original = doc.text
            for step in steps:
                try:
                    ok = step(doc) is not None
                except Exception as e:  # noqa: BLE001 - one document's failure is counted, not fatal
                    failed(doc, step.name, e)
                    ok, step.last_reason = False, f"{step.name}:error_{type(e).__name__}"
                if not ok:
                    if removed_f is not None:
                        doc.text = original
                        doc.metadata["removed_by"] = step.last_reason
                        removed_f.write(json.dumps(doc.to_json(), ensure_ascii=False) + "\n")
                    break
            else:
                try:
                    line = json.dumps(doc.to_json(), ensure_ascii=False)
                    line.encode("utf-8")  # fails here, on this document, rather than in the writer
                    key = exact_key(doc.text) if (cfg.dedup.exact or cfg.dedup.minhash) else None
                    sig = signer.signature(doc.text) if signer is not None else None
                except Exception as e:  # noqa: BLE001 - e.g. an unencodable metadata value
                    failed(doc, "write", e)
                    continue
                if key is not None:
                    exact.append(key)
                if sig is not None:
                    sigs.append(sig)
                yield line
            if n % PROGRESS_EVERY == 0:
                report_progress(PROGRESS_EVERY, 0, reader.bytes_read - last_bytes)
                last_bytes = reader.bytes_read

    kept = write_lines(out / "filtered" / f"{task:05d}.jsonl.zst", kept_docs())
    if removed_f is not None:
        removed_f.close()
        os.replace(removed_path.with_name(removed_path.name + ".tmp"), removed_path)
    nperm = cfg.dedup.num_perm
    _atomic_npz(
        out / "signatures" / f"{task:05d}.npz",
        exact=np.asarray(exact, np.uint64),
        sig=np.asarray(sigs, np.uint64).reshape(len(sigs), nperm if sigs else 0),
    )
    report_progress(reader.stats.seen % PROGRESS_EVERY, 0, reader.bytes_read - last_bytes)
    step_stats = [reader.stats.to_json()] + [st.to_json() for s in steps for st in s.all_stats()]
    if errors.seen:
        step_stats.append(errors.to_json())
    return {"task": task, "input": part.name, "kept": kept, "steps": step_stats}


# ---------------------------------------------------------------- dedup (one task)
def dedup_task(cfg: PipelineConfig, task: int) -> dict[str, Any]:
    if cfg.dedup.band_tasks > 0:  # the distributed stages' last step (lsh_stages.py)
        from megaqwen.data_pipeline.lsh_stages import clusters_task

        return clusters_task(cfg, task)
    out = cfg.out
    n = n_input_tasks(cfg)
    require_complete(out, "filter", n)
    exact_parts, sig_parts, owner = [], [], []
    for t in range(n):
        z = np.load(out / "signatures" / f"{t:05d}.npz")
        exact_parts.append(z["exact"])
        sig_parts.append(
            z["sig"] if z["sig"].size else np.zeros((len(z["exact"]), cfg.dedup.num_perm), np.uint64)
        )
        owner += [(t, i) for i in range(len(z["exact"]))]
    exact = np.concatenate(exact_parts) if exact_parts else np.zeros(0, np.uint64)
    sigs = np.concatenate(sig_parts) if sig_parts else np.zeros((0, cfg.dedup.num_perm), np.uint64)
    removed, stats = find_duplicates(exact, sigs, cfg.dedup)
    by_task: dict[str, list[list]] = {}
    for i, (j, kind) in sorted(removed.items()):
        t, pos = owner[i]
        by_task.setdefault(str(t), []).append([pos, list(owner[j]), kind])
    _atomic_json(out / "dedup" / "duplicates.json", by_task)
    return {
        "task": task,
        "documents": len(exact),
        "removed": len(removed),
        "steps": [s.to_json() for s in stats],
    }


def _duplicates(cfg: PipelineConfig, task: int) -> set[int]:
    if cfg.dedup.band_tasks > 0:
        from megaqwen.data_pipeline.lsh_stages import read_removals

        return set(read_removals(cfg, task)["pos"].tolist())
    p = cfg.out / "dedup" / "duplicates.json"
    if not p.is_file():
        raise RuntimeError(f"{p} is missing: run the dedup stage first")
    return {pos for pos, _, _ in json.loads(p.read_text()).get(str(task), [])}


def _deduped(cfg: PipelineConfig, task: int, stats: StepStats | None = None):
    dups = _duplicates(cfg, task)
    for pos, doc in enumerate(read_documents(cfg.out / "filtered" / f"{task:05d}.jsonl.zst")):
        if stats is not None:
            stats.seen += 1
        if pos in dups:
            if stats is not None:
                stats.remove("dedup:duplicate")
            continue
        if stats is not None:
            stats.kept += 1
        yield doc


# ---------------------------------------------------------------- judge (one task per input part)
def _sample_key(doc_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little")


def judge_task(cfg: PipelineConfig, task: int) -> dict[str, Any]:
    n = n_input_tasks(cfg)
    per_task = -(-cfg.judge.sample_size // n)
    candidates = sorted(_deduped(cfg, task), key=lambda d: _sample_key(d.id))
    docs = candidates[:per_task]
    judge = get_judge(cfg)
    want_domains = cfg.domains.backend in ("judge", "distilled")
    path = cfg.out / "judge" / f"{task:05d}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    bs = cfg.judge.batch_size
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(0, len(docs), bs):
            batch = docs[i : i + bs]
            texts = [d.text for d in batch]
            judged = judge.score(texts)
            doms = judge.domains(texts, cfg.domains.taxonomy) if want_domains else [None] * len(batch)
            for d, j, dom in zip(batch, judged, doms):
                rec = {"id": d.id, "text": d.text, "scores": j.scores, "mass": j.mass}
                if dom is not None:
                    rec["domain_probs"] = dom
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            report_progress(len(batch), 0, 0)
    os.replace(tmp, path)
    return {"task": task, "judged": len(docs), "candidates": len(candidates)}


def read_judge_labels(cfg: PipelineConfig) -> list[dict[str, Any]]:
    n = n_input_tasks(cfg)
    require_complete(cfg.out, "judge", n)
    recs = []
    for t in range(n):
        with open(cfg.out / "judge" / f"{t:05d}.jsonl", encoding="utf-8") as f:
            recs += [json.loads(line) for line in f if line.strip()]
    return recs


# ---------------------------------------------------------------- train_scorer (one task)
def train_scorer_task(cfg: PipelineConfig, task: int) -> dict[str, Any]:
    from megaqwen.data_pipeline.embed import get_encoder
    from megaqwen.data_pipeline.scorer import RidgeScorer, SoftmaxClassifier, agreement, split_indices

    recs = [
        r for r in read_judge_labels(cfg) if all(np.isfinite(r["scores"][d]) for d in cfg.judge.dimensions)
    ]
    if len(recs) < 4:
        raise ValueError(
            f"only {len(recs)} usable judge labels in {cfg.out / 'judge'}; need at least 4 "
            f"(raise judge.sample_size)"
        )
    s = cfg.scorer
    enc = get_encoder(s.encoder, s.max_length, s.batch_size, s.encoder_kind, s.threads)
    x_ND = enc.encode([r["text"] for r in recs])
    dims = list(cfg.judge.dimensions) + ["overall"]
    y_NK = np.array([[r["scores"][d] for d in dims] for r in recs])
    tr, ho = split_indices(len(recs), cfg.scorer.heldout_fraction, cfg.scorer.seed)
    held = RidgeScorer.fit(x_ND[tr], y_NK[tr], dims, cfg.scorer.ridge_alpha)
    metrics: dict[str, Any] = {
        "train": len(tr),
        "heldout": len(ho),
        "quality": agreement(held.predict(x_ND[ho]), y_NK[ho], dims),
        # the trivial predictor: every held-out document gets the training labels' mean
        "baseline": agreement(np.tile(y_NK[tr].mean(0), (len(ho), 1)), y_NK[ho], dims),
        "judge_score_std": {d: round(float(np.std(y_NK[:, j])), 4) for j, d in enumerate(dims)},
    }
    metrics["warnings"] = scorer_warnings(metrics, dims)
    out = cfg.out / "scorer"
    out.mkdir(parents=True, exist_ok=True)
    # the shipped head is refit on all labels once agreement has been measured on the held-out split
    RidgeScorer.fit(x_ND, y_NK, dims, cfg.scorer.ridge_alpha).save(out / "quality.npz")
    if cfg.domains.backend == "distilled":
        names = list(cfg.domains.taxonomy)
        y = np.array([int(np.argmax([r["domain_probs"][n] for n in names])) for r in recs])
        clf = SoftmaxClassifier.fit(x_ND[tr], y[tr], names)
        metrics["domain_accuracy_vs_judge"] = float(np.mean(clf.predict_proba(x_ND[ho]).argmax(1) == y[ho]))
        majority = float(np.mean(y[ho] == np.bincount(y[tr], minlength=len(names)).argmax()))
        metrics["domain_majority_baseline"] = majority
        if metrics["domain_accuracy_vs_judge"] <= majority + 0.05:
            metrics["warnings"].append(
                f"distilled domain classifier: {metrics['domain_accuracy_vs_judge']:.0%} agreement with "
                "the judge on held-out documents, not clearly above the majority-domain baseline "
                f"({majority:.0%})"
            )
        SoftmaxClassifier.fit(x_ND, y, names).save(out / "domain.npz")
    for w in metrics["warnings"]:
        log.warning("train_scorer: %s", w)
    _atomic_json(out / "metrics.json", metrics)
    return {"task": task, **metrics}


MIN_JUDGE_STD = 0.1  # points on the 0-5 scale: below this the judge tells documents apart by noise


def scorer_warnings(metrics: dict[str, Any], dims: list[str]) -> list[str]:
    """Why the scorer's agreement numbers may mean nothing: a flat judge, or no gain over the mean."""
    out = []
    for d in dims:
        std = metrics["judge_score_std"][d]
        q, b = metrics["quality"][d], metrics["baseline"][d]
        if std < MIN_JUDGE_STD:
            out.append(
                f"{d}: judge scores have near-zero variance (std {std:.3f} on a 0-5 scale): the judge "
                "does not tell documents apart, so the distilled scorer's Pearson / agreement are "
                "meaningless (is the judge a real instruction-tuned model?)"
            )
        elif not q["mae"] < 0.95 * b["mae"]:
            out.append(
                f"{d}: distilled scorer MAE {q['mae']:.3f} is not below the predict-the-mean baseline's "
                f"{b['mae']:.3f} on held-out labels: it has learned nothing usable (more judge labels?)"
            )
    return out


# ---------------------------------------------------------------- annotate (one task per input part)
def annotate_task(cfg: PipelineConfig, task: int) -> dict[str, Any]:
    """Apply dedup, score quality (with a judge), label domains (domains.py), count tokens, write."""
    from megaqwen.data_pipeline.domains import DomainLabeler
    from megaqwen.data_pipeline.embed import get_encoder
    from megaqwen.data_pipeline.scorer import RidgeScorer

    # a rerun first removes what this task wrote before (a domain it no longer feeds keeps no old file)
    for old in cfg.out.glob(f"annotated/*/{task:05d}.jsonl.zst"):
        old.unlink()
    slugs = domain_slugs(cfg.domains.taxonomy)
    dedup_stats, quality_stats = StepStats("dedup"), StepStats("quality")
    # a document with no tokens (empty text, when no step removed it) would be a lone EOD in the
    # shard, and a domain of only such documents would have no shard at all: dropped here, counted
    token_stats = StepStats("tokens")
    docs = list(_deduped(cfg, task, dedup_stats))
    from megaqwen.data_pipeline.synthesize import is_synthetic, read_synthetic

    docs += read_synthetic(cfg, task)  # after the corpus: its token counts bound their share (remix)
    synthetic_stats = StepStats("synthetic_cap")
    pending: list[tuple[Any, int]] = []  # synthetic documents, written after the cap
    s = cfg.scorer
    scorer, enc = None, None
    if cfg.judge.backend != "none":
        scorer = RidgeScorer.load(cfg.out / "scorer" / "quality.npz")
        enc = get_encoder(s.encoder, s.max_length, s.batch_size, s.encoder_kind, s.threads)
    labeler = DomainLabeler(cfg, enc)
    # the shards stage tokenises with the same tokenizer, so these counts are the shards' (less EODs)
    tok = text_tokenizer(cfg.remix.tokenizer)
    writers: dict[str, Any] = {}
    domain_tokens: Counter = Counter()
    domain_docs: Counter = Counter()
    bs = max(cfg.scorer.batch_size, 1) * 8  # the encoders batch internally
    for i in range(0, len(docs), bs):
        batch = docs[i : i + bs]
        texts = [d.text for d in batch]
        x_ND = enc.encode(texts) if enc is not None else None
        doms = labeler.label(batch, x_ND)
        scores = scorer.predict(x_ND) if scorer is not None else None
        ntok = [len(e.ids) for e in tok.encode_batch_fast(texts, add_special_tokens=False)]
        for k, d in enumerate(batch):
            token_stats.seen += 1
            if ntok[k] == 0:
                token_stats.remove("tokens:empty")
                continue
            token_stats.kept += 1
            quality_stats.seen += 1
            d.metadata["domain"], d.metadata["domain_score"] = doms[k]
            d.metadata["tokens"] = ntok[k]
            if scores is not None:
                d.metadata["quality"] = {n: round(float(v), 4) for n, v in zip(scorer.dims, scores[k])}
                q = d.metadata["quality"].get(cfg.quality.dimension)
                if q is None:
                    raise ValueError(
                        f"quality.dimension {cfg.quality.dimension!r} is not one of {scorer.dims}"
                    )
                if cfg.quality.min_score is not None and q < cfg.quality.min_score:
                    quality_stats.remove(f"quality:below_{cfg.quality.min_score}")
                    continue
            quality_stats.kept += 1
            if is_synthetic(d):
                pending.append((d, ntok[k]))
                continue
            dom = d.metadata["domain"]
            if dom not in writers:
                p = cfg.out / "annotated" / slugs.get(dom, slug(dom)) / f"{task:05d}.jsonl.zst"
                writers[dom] = (p, open_writer(p.with_name(p.name + ".tmp")))
            writers[dom][1].write(json.dumps(d.to_json(), ensure_ascii=False) + "\n")
            domain_tokens[dom] += ntok[k]
            domain_docs[dom] += 1
        report_progress(len(batch), sum(ntok), 0)
    synthetic_tokens: Counter = Counter()
    if pending:
        from megaqwen.data_pipeline.remix import cap_synthetic

        keep = cap_synthetic(
            [(d.metadata["domain"], n, float(d.metadata.get("synthetic_score", 0.0))) for d, n in pending],
            dict(domain_tokens),
            cfg.remix.synthetic_cap,
        )
        for (d, n), ok in zip(pending, keep):
            synthetic_stats.seen += 1
            dom = d.metadata["domain"]
            if not ok:
                synthetic_stats.remove(f"synthetic_cap:over_{cfg.remix.synthetic_cap(dom)}_of_{dom}")
                continue
            synthetic_stats.kept += 1
            if dom not in writers:
                p = cfg.out / "annotated" / slugs.get(dom, slug(dom)) / f"{task:05d}.jsonl.zst"
                writers[dom] = (p, open_writer(p.with_name(p.name + ".tmp")))
            writers[dom][1].write(json.dumps(d.to_json(), ensure_ascii=False) + "\n")
            synthetic_tokens[dom] += n
            domain_docs[dom] += 1
        domain_tokens.update(synthetic_tokens)
    for p, f in writers.values():
        f.close()
        os.replace(p.with_name(p.name + ".tmp"), p)
    labeler.close()
    return {
        "task": task,
        "steps": [dedup_stats.to_json(), token_stats.to_json(), quality_stats.to_json()]
        + ([synthetic_stats.to_json()] if synthetic_stats.seen else []),
        "domain_tokens": dict(domain_tokens),
        "domain_docs": dict(domain_docs),
        "synthetic_tokens": dict(synthetic_tokens),
    }


def annotated_domain_tokens(cfg: PipelineConfig) -> dict[str, int]:
    total: Counter = Counter()
    for m in load_markers(cfg.out, "annotate"):
        total.update(m["domain_tokens"])
    return dict(total)
