"""Measure a pipeline config against a labelled corpus (such as `eval_corpus.jsonl`).

    python -m megaqwen.data_pipeline.samples.evaluate_corpus [--config sample] [--corpus PATH] [--domains]

Runs the filter and dedup stages (and with `--domains` train_domains + annotate) on the corpus and
reports, from the records' `label`s:
- loss: the share of clean documents the filters removed, by content type and language;
- code integrity: kept clean code whose text differs from the input by more than the documented
  normalisations (NFC, CRLF -> LF, control / zero-width characters) and its planted-PII masks;
- junk recall: the share of planted junk removed (by filters or dedup);
- duplicate recall: planted exact / near duplicate pairs of which exactly one document survives;
- PII recall per type (the planted string is gone from the kept text) and the share of clean
  documents without planted PII whose text the pii step changed;
- content type: the share of code (math) documents labelled code (math), and with `--domains` the
  share of code documents in the "code" domain.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from megaqwen.data_pipeline.config import PipelineConfig, load_config
from megaqwen.data_pipeline.io import read_documents
from megaqwen.data_pipeline.pipeline import run_stage

CORPUS = Path(__file__).with_name("eval_corpus.jsonl")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]")
PLACEHOLDERS = ("<EMAIL>", "<PHONE>", "<IP_ADDRESS>", "<SECRET>")


def documented_normalisation(text: str) -> str:
    """What normalize may do to code (see steps/normalize.py)."""
    t = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL.sub("", t)


def _docs(folder: Path) -> dict[str, Any]:
    return {d.id: d for p in sorted(folder.rglob("*.jsonl.zst")) for d in read_documents(p)}


def evaluate(cfg: PipelineConfig, corpus: Path = CORPUS, domains: bool = False) -> dict[str, Any]:
    labels = {}
    originals = {}
    for line in corpus.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        labels[r["id"]], originals[r["id"]] = r["label"], r["text"]
    cfg.input.paths, cfg.input.text_key, cfg.input.id_key = [str(corpus)], "text", "id"
    cfg.validate()
    stages = ["filter", "dedup"] + (["train_domains", "annotate"] if domains else [])
    for s in stages:
        run_stage(cfg, s, progress=False)
    filtered = _docs(cfg.out / "filtered")
    removed = _docs(cfg.out / "removed") if (cfg.out / "removed").is_dir() else {}
    dup_removed = set()
    dups = json.loads((cfg.out / "dedup" / "duplicates.json").read_text())
    by_task = {}
    for t in range(len(list((cfg.out / "filtered").glob("*.jsonl.zst")))):
        by_task[t] = [d.id for d in read_documents(cfg.out / "filtered" / f"{t:05d}.jsonl.zst")]
    for t, entries in dups.items():
        for pos, _, _ in entries:
            dup_removed.add(by_task[int(t)][pos])
    out: dict[str, Any] = {"documents": len(labels)}

    # losses of clean documents to the filters, by content type and by language (prose)
    lost: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    reasons: dict[str, Counter] = defaultdict(Counter)
    for i, lab in labels.items():
        if lab["kind"] != "clean":
            continue
        keys = [lab["content"]] + ([f"prose:{lab['lang']}"] if lab["content"] == "prose" else [])
        keys += [f"{lab['content']}:{lab['genre']}"] if "genre" in lab else []
        for k in keys:
            lost[k][1] += 1
            if i not in filtered:
                lost[k][0] += 1
                reasons[k][removed[i].metadata.get("removed_by", "?") if i in removed else "?"] += 1
    out["clean_loss"] = {
        k: {"lost": a, "of": b, "rate": round(a / b, 4)} for k, (a, b) in sorted(lost.items())
    }
    out["clean_loss_reasons"] = {k: dict(v.most_common(5)) for k, v in sorted(reasons.items())}

    # kept code is the input up to documented normalisations and planted-PII masks
    changed, code_kept = [], 0
    for i, lab in labels.items():
        if lab["kind"] == "clean" and lab["content"] == "code" and i in filtered:
            code_kept += 1
            want = documented_normalisation(originals[i])
            for p in lab.get("pii", []):
                want = want.replace(p["value"], "\0")
            got = filtered[i].text
            for ph in PLACEHOLDERS:
                got = got.replace(ph, "\0")
            if got != want:
                changed.append(i)
    out["code_integrity"] = {
        "kept": code_kept,
        "changed_beyond_documented": len(changed),
        "ids": changed[:10],
    }

    # junk and duplicate recall
    junk = [i for i, lab in labels.items() if lab["kind"] == "junk"]
    junk_kept = [i for i in junk if i in filtered and i not in dup_removed]
    out["junk_recall"] = {
        "removed": len(junk) - len(junk_kept),
        "of": len(junk),
        "rate": round(1 - len(junk_kept) / max(len(junk), 1), 4),
        "kept_kinds": dict(Counter(labels[i]["junk"] for i in junk_kept)),
    }

    # a planted pair is resolved when exactly one of (duplicate, original) survives dedup
    def survives(i: str) -> bool:
        return i in filtered and i not in dup_removed

    pairs = [(i, lab["duplicate_of"], lab["near"]) for i, lab in labels.items() if lab["kind"] == "duplicate"]
    out["duplicate_recall"] = {
        kind: {
            "resolved": sum(survives(a) != survives(b) for a, b, n in pairs if n == near),
            "of": sum(1 for *_, n in pairs if n == near),
        }
        for kind, near in (("exact", False), ("near", True))
    }

    # PII recall and clean documents altered
    found: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    missed = []
    for i, lab in labels.items():
        for p in lab.get("pii", []):
            if i not in filtered:
                continue
            found[p["type"]][1] += 1
            if p["value"] not in filtered[i].text:
                found[p["type"]][0] += 1
            else:
                missed.append(p["value"])
    out["pii_recall"] = {
        k: {"masked": a, "of": b, "rate": round(a / max(b, 1), 4)} for k, (a, b) in found.items()
    }
    out["pii_missed"] = missed[:10]
    altered = [
        i
        for i, lab in labels.items()
        if lab["kind"] == "clean"
        and "pii" not in lab
        and i in filtered
        and "pii_masked" in filtered[i].metadata
    ]
    n_clean = sum(
        1 for i, lab in labels.items() if lab["kind"] == "clean" and "pii" not in lab and i in filtered
    )
    out["clean_altered_by_pii"] = {
        "altered": len(altered),
        "of": n_clean,
        "rate": round(len(altered) / max(n_clean, 1), 4),
        "examples": [filtered[i].metadata["pii_masked"] for i in altered[:5]],
    }

    # content type (all documents that reached the route step) and domains
    ct = defaultdict(Counter)
    for i, lab in labels.items():
        d = filtered.get(i) or removed.get(i)
        if d is not None and lab["kind"] == "clean":
            ct[lab["content"]][d.metadata.get("content_type", "?")] += 1
    out["content_type"] = {
        k: {
            "as_" + k: v[k],
            "of": sum(v.values()),
            "rate": round(v[k] / sum(v.values()), 4),
            "confusions": dict(v),
        }
        for k, v in ct.items()
    }
    if domains:
        annotated = _docs(cfg.out / "annotated")
        code = [
            i
            for i, lab in labels.items()
            if lab["kind"] == "clean" and lab["content"] == "code" and i in annotated
        ]
        out["code_domain"] = {
            "as_code": sum(annotated[i].metadata["domain"] == "code" for i in code),
            "of": len(code),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="sample", help="pipeline config (name or path)")
    p.add_argument("--corpus", type=Path, default=CORPUS)
    p.add_argument("--domains", action="store_true", help="also run train_domains + annotate")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--json", type=Path, help="also write the metrics here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="dp_eval_") as tmp:
        cfg = load_config(args.config, {"output_dir": tmp, "workers": args.workers})
        cfg.input.parts_per_file = 2
        res = evaluate(cfg, args.corpus, args.domains)
    text = json.dumps(res, indent=1, ensure_ascii=False)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
