"""The `train_domains` stage: zero-shot MiniLM labels a sample, a linear student labels the corpus.

MiniLM on CPU labels ~15 documents/s per core (256 tokens), too slow for a corpus. So it is the
teacher: it labels `domains.teacher_sample` deduplicated documents (picked by hash of the id, the
ones the content-type pass has not already sent to code / math), and a multinomial logistic
regression on static embeddings (`embed.StaticEncoder`, distilled from the same MiniLM) learns those
labels. The annotate stage then runs only the student (hundreds of documents/s per core).

`scorer/domain_metrics.json` reports the student's agreement with the teacher on held-out documents
next to the majority-class baseline, and a warning when the student does not beat it.
"""

from __future__ import annotations

import heapq
import json
import logging
from typing import Any

import numpy as np

from megaqwen.data_pipeline.config import PipelineConfig

log = logging.getLogger("megaqwen.data_pipeline")


def student_encoder(cfg: PipelineConfig):
    from megaqwen.data_pipeline.embed import get_encoder

    s = cfg.scorer
    return get_encoder(s.encoder, s.max_length, s.batch_size, "static", s.threads)


def load_student(cfg: PipelineConfig):
    from megaqwen.data_pipeline.scorer import SoftmaxClassifier

    p = cfg.out / "scorer" / "domain_student.npz"
    if not p.is_file():
        raise RuntimeError(f"{p} is missing: run the train_domains stage first")
    return SoftmaxClassifier.load(p)


def _sample(cfg: PipelineConfig) -> list[str]:
    from megaqwen.data_pipeline.domains import content_domain
    from megaqwen.data_pipeline.stages import _deduped, _sample_key, n_input_tasks

    heap: list[tuple[int, str, str]] = []  # the `teacher_sample` smallest keys, as a max-heap
    k = cfg.domains.teacher_sample
    for t in range(n_input_tasks(cfg)):
        for doc in _deduped(cfg, t):
            if cfg.domains.content_first and content_domain(doc, cfg.domains.taxonomy) is not None:
                continue
            key = _sample_key(doc.id)
            if len(heap) < k:
                heapq.heappush(heap, (-key, doc.id, doc.text))
            elif -heap[0][0] > key:
                heapq.heapreplace(heap, (-key, doc.id, doc.text))
    return [text for _, _, text in sorted(heap, key=lambda h: (-h[0], h[1]))]


def _prepare_static_rows(cfg: PipelineConfig) -> int:
    """Distil, here and once, the static rows of every token the corpus uses (a tokenizer pass over the
    deduplicated documents): the annotate workers then never load the transformer."""
    from megaqwen.data_pipeline.stages import _deduped, n_input_tasks

    enc = student_encoder(cfg)
    added, batch = 0, []
    for t in range(n_input_tasks(cfg)):
        for doc in _deduped(cfg, t):
            batch.append(doc.text)
            if len(batch) == 1024:
                added += enc.prepare(batch)
                batch = []
    if batch:
        added += enc.prepare(batch)
    enc.save_cache()
    return added


def train_domains_task(cfg: PipelineConfig, task: int) -> dict[str, Any]:
    from megaqwen.data_pipeline.domains import ZeroShotDomains
    from megaqwen.data_pipeline.embed import get_encoder
    from megaqwen.data_pipeline.scorer import SoftmaxClassifier, split_indices
    from megaqwen.data_pipeline.stages import _atomic_json

    texts = _sample(cfg)
    names = list(cfg.domains.taxonomy)
    out = cfg.out / "scorer"
    out.mkdir(parents=True, exist_ok=True)
    s = cfg.scorer
    if not texts:  # everything was code / math: the student is never asked
        y = np.zeros(0, int)
        x = np.zeros((0, 1), np.float32)
    else:
        teacher_enc = get_encoder(s.encoder, s.max_length, s.batch_size, "transformer", s.threads)
        teacher = ZeroShotDomains(teacher_enc, cfg.domains.taxonomy, cfg.domains.min_similarity)
        y = np.array([names.index(d) for d, _ in teacher.classify(teacher_enc.encode(texts))])
        enc = student_encoder(cfg)
        x = enc.encode(texts)
        enc.save_cache()
    metrics: dict[str, Any] = {"teacher_labels": len(y), "teacher_domains": {}, "warnings": []}
    for j in y:
        metrics["teacher_domains"][names[j]] = metrics["teacher_domains"].get(names[j], 0) + 1
    if len(y) >= 4 and len(set(y.tolist())) >= 2:
        tr, ho = split_indices(len(y), s.heldout_fraction, s.seed)
        clf = SoftmaxClassifier.fit(x[tr], y[tr], names, l2=cfg.domains.student_l2)
        acc = float(np.mean(clf.predict_proba(x[ho]).argmax(1) == y[ho]))
        majority = float(np.mean(y[ho] == np.bincount(y[tr], minlength=len(names)).argmax()))
        metrics.update(heldout=len(ho), student_vs_teacher=acc, majority_baseline=majority)
        if acc <= majority + 0.05:
            metrics["warnings"].append(
                f"the domain student agrees with the teacher on {acc:.0%} of held-out documents, not "
                f"clearly above always answering the most common domain ({majority:.0%}): raise "
                "domains.teacher_sample or set domains.student: false"
            )
    elif len(y):
        metrics["warnings"].append(
            f"the teacher gave {len(y)} label(s) in {len(set(y.tolist()))} domain(s): too few to measure "
            "the student; it will answer the teacher's majority domain"
        )
    if len(y):
        if len(set(y.tolist())) >= 2:
            clf = SoftmaxClassifier.fit(x, y, names, l2=cfg.domains.student_l2)
        else:  # one class: a classifier that always answers it
            w = np.zeros((x.shape[1] + 1, len(names)))
            w[-1, y[0]] = 1.0
            clf = SoftmaxClassifier(names, w)
    else:
        w = np.zeros((student_encoder(cfg).dim + 1, len(names)))
        w[-1, names.index("other") if "other" in names else 0] = 1.0
        clf = SoftmaxClassifier(names, w)
    clf.save(out / "domain_student.npz")
    metrics["static_rows_distilled"] = _prepare_static_rows(cfg)
    for w_ in metrics["warnings"]:
        log.warning("train_domains: %s", w_)
    _atomic_json(out / "domain_metrics.json", metrics)
    return {"task": task, **json.loads(json.dumps(metrics))}
