"""Stats JSON and a Markdown report with PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from megaqwen.data_pipeline.config import PipelineConfig
from megaqwen.data_pipeline.executor import load_markers
from megaqwen.data_pipeline.io import read_documents


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _reasons(summary: dict[str, Any]) -> Counter:
    c: Counter = Counter()
    from megaqwen.data_pipeline.pipeline import SUMMARY_STAGES

    for stage in SUMMARY_STAGES:
        for s in summary.get(stage, []):
            if stage == "annotate" and s["name"] == "dedup":
                continue  # applying the dedup stage's decisions: already counted there
            if "/" in s["name"]:
                continue  # a routed sub-step: its removals are in the router's row
            c.update(s["reasons"])
    return c


def plot_reasons(reasons: Counter, path: Path) -> None:
    plt = _plt()
    items = reasons.most_common()[::-1]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(items) + 1.2))
    ax.barh([k for k, _ in items], [v for _, v in items], color="#c0504d")
    for i, (_, v) in enumerate(items):
        ax.text(v, i, f" {v}", va="center", fontsize=8)
    ax.set_xlabel("documents removed")
    ax.set_title("Removal reasons (all steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scores(scores: dict[str, list[float]], judge: dict[str, list[float]], path: Path) -> None:
    plt = _plt()
    dims = list(scores)
    fig, axes = plt.subplots(1, len(dims), figsize=(3.2 * len(dims), 3), squeeze=False)
    bins = np.linspace(0, 5, 26)
    for ax, d in zip(axes[0], dims):
        ax.hist(scores[d], bins=bins, alpha=0.7, label=f"distilled (n={len(scores[d])})", color="#4f81bd")
        if judge.get(d):
            ax.hist(judge[d], bins=bins, alpha=0.6, label=f"judge (n={len(judge[d])})", color="#f79646")
        ax.set_title(d)
        ax.set_xlabel("score (0-5)")
    axes[0][0].set_ylabel("documents")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_mix(before: dict[str, float], after: dict[str, dict[str, float]], path: Path) -> None:
    plt = _plt()
    domains = sorted(before)
    x = np.arange(len(domains))
    width = 0.8 / (1 + len(after))
    fig, ax = plt.subplots(figsize=(max(7, 0.7 * len(domains)), 3.8))
    ax.bar(x, [100 * before[d] for d in domains], width, label="before (natural)", color="#7f7f7f")
    for i, (name, w) in enumerate(after.items(), start=1):
        ax.bar(x + i * width, [100 * w.get(d, 0.0) for d in domains], width, label=f"after: {name}")
    ax.set_xticks(x + width * len(after) / 2)
    ax.set_xticklabels(domains, rotation=35, ha="right")
    ax.set_ylabel("% of tokens")
    ax.set_title("Domain mix before and after re-mixing")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(cfg: PipelineConfig) -> dict[str, Any]:
    from megaqwen.data_pipeline.pipeline import summary

    out = cfg.out / "report"
    out.mkdir(parents=True, exist_ok=True)
    summ = summary(cfg)
    recipes = {m_["task"]: m_ for m_ in load_markers(cfg.out, "recipes")}
    plans = next(iter(recipes.values()))["plans"] if recipes else {}
    tokens = next(iter(recipes.values()))["domain_tokens"] if recipes else {}
    metrics_p = cfg.out / "scorer" / "metrics.json"
    metrics = json.loads(metrics_p.read_text()) if metrics_p.is_file() else None
    dom_p = cfg.out / "scorer" / "domain_metrics.json"
    domain_student = json.loads(dom_p.read_text()) if dom_p.is_file() else None

    # scores and domain agreement from the annotated documents
    scores: dict[str, list[float]] = {}
    hint_pairs: list[tuple[str, str]] = []
    # (language, domain, content type, source) -> [documents, tokens] of the annotated output
    cells: dict[tuple[str, str, str, str], list[int]] = {}
    for p in sorted((cfg.out / "annotated").rglob("*.jsonl.zst")):
        for d in read_documents(p):
            m = d.metadata
            key = (
                m.get("language", "und"),
                m.get("domain", "?"),
                m.get("content_type", "prose"),
                m.get("source", "corpus"),
            )
            c = cells.setdefault(key, [0, 0])
            c[0] += 1
            c[1] += int(m.get("tokens", 0))
            for k, v in d.metadata.get("quality", {}).items():
                scores.setdefault(k, []).append(v)
            if "domain_hint" in d.metadata:
                hint_pairs.append((d.metadata["domain_hint"], d.metadata["domain"]))
    judge: dict[str, list[float]] = {}
    for p in sorted((cfg.out / "judge").glob("*.jsonl")) if (cfg.out / "judge").is_dir() else []:
        for line in p.read_text(encoding="utf-8").splitlines():
            for k, v in json.loads(line)["scores"].items():
                judge.setdefault(k, []).append(v)

    reasons = _reasons(summ)
    plots = {}
    if reasons:
        plot_reasons(reasons, out / "removal_reasons.png")
        plots["removal reasons"] = "removal_reasons.png"
    if scores:
        plot_scores(scores, judge, out / "score_histograms.png")
        plots["score histograms"] = "score_histograms.png"
    total = sum(tokens.values())
    before = {d: t / total for d, t in tokens.items()} if total else {}
    if before and plans:
        plot_mix(before, {n: p["weights"] for n, p in plans.items()}, out / "domain_mix.png")
        plots["domain mix"] = "domain_mix.png"
    domain_acc = (sum(a == b for a, b in hint_pairs) / len(hint_pairs)) if hint_pairs else None
    composition = [
        {
            "language": k[0],
            "domain": k[1],
            "content_type": k[2],
            "source": k[3],
            "documents": v[0],
            "tokens": v[1],
        }
        for k, v in sorted(cells.items())
    ]
    syn_tok: Counter = Counter()
    all_tok: Counter = Counter()
    for r in composition:
        all_tok[r["domain"]] += r["tokens"]
        if r["source"] == "synthetic":
            syn_tok[r["domain"]] += r["tokens"]
    synthetic_share = (
        {
            "total": sum(syn_tok.values()) / max(sum(all_tok.values()), 1),
            "by_domain": {d: syn_tok[d] / t for d, t in sorted(all_tok.items()) if t},
            "cap": cfg.remix.synthetic_max_share,
        }
        if syn_tok or cfg.synthesize.enabled
        else None
    )
    stats = {
        "steps": summ,
        "domain_tokens": tokens,
        "plans": plans,
        "scorer_agreement": metrics,
        "domain_accuracy_vs_hint": domain_acc,
        "domain_student": domain_student,
        "warnings": (metrics or {}).get("warnings", []) + (domain_student or {}).get("warnings", []),
        "removal_reasons": dict(reasons),
        "composition": composition,
        "synthetic_share": synthetic_share,
        "plots": plots,
    }
    (cfg.out / "stats.json").write_text(json.dumps(stats, indent=1, default=str))
    (out / "report.md").write_text(_markdown(stats), encoding="utf-8")
    return {"report": str(out / "report.md"), "plots": plots}


def _extraction_yield(rows: list[dict[str, Any]]) -> list[str]:
    """The html_extract step's yield (bytes of HTML in -> bytes of main text out), when it ran."""
    ch = next((r.get("changes", {}) for r in rows if r["name"] == "html_extract"), {})
    if not ch.get("html_bytes"):
        return []
    html, text = ch["html_bytes"], ch.get("text_bytes", 0)
    return [
        f"Extraction yield: {html / 1e6:.2f} MB of HTML -> {text / 1e6:.2f} MB of main text "
        f"({text / html:.1%}).",
        "",
    ]


def _markdown(s: dict[str, Any]) -> str:
    lines = ["# Data pipeline report", ""]
    if s.get("warnings"):
        lines += ["## Warnings", ""] + [f"- {w}" for w in s["warnings"]] + [""]
    from megaqwen.data_pipeline.pipeline import SUMMARY_STAGES

    for stage in SUMMARY_STAGES:
        rows = s["steps"].get(stage) or []
        if not rows:
            continue
        lines += [
            f"## {stage}",
            "",
            "| step | seen | kept | removed | modified | top reasons |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for r in rows:
            top = ", ".join(f"{k} ({v})" for k, v in sorted(r["reasons"].items(), key=lambda kv: -kv[1])[:4])
            lines.append(
                f"| {r['name']} | {r['seen']} | {r['kept']} | {r['removed']} | {r['modified']} | {top} |"
            )
        lines.append("")
        lines += _extraction_yield(rows)
    if "judge" in s["steps"]:
        j = s["steps"]["judge"]
        lines += [f"The LLM judge labelled {j['labelled']} of {j['candidates']} deduplicated documents.", ""]
    if s["scorer_agreement"]:
        m = s["scorer_agreement"]
        lines += [
            "## Distilled scorer vs judge (held-out)",
            "",
            f"{m['train']} training labels, {m['heldout']} held out.",
            "",
            "| dimension | Pearson | Spearman | MAE | within 0.5 |",
            "|---|---:|---:|---:|---:|",
        ]
        for d, a in m["quality"].items():
            lines.append(
                f"| {d} | {a['pearson']:.3f} | {a['spearman']:.3f} | {a['mae']:.3f} | {a['within_0.5']:.2f} |"
            )
        if "domain_accuracy_vs_judge" in m:
            lines.append(
                f"\nDistilled domain classifier agrees with the judge on "
                f"{100 * m['domain_accuracy_vs_judge']:.1f}% of held-out documents."
            )
        lines.append("")
    ds = s.get("domain_student")
    if ds and "student_vs_teacher" in ds:
        lines += [
            f"Domain student (static embeddings) agrees with the zero-shot MiniLM teacher on "
            f"{100 * ds['student_vs_teacher']:.1f}% of {ds['heldout']} held-out documents "
            f"(majority-domain baseline {100 * ds['majority_baseline']:.1f}%).",
            "",
        ]
    if s["domain_accuracy_vs_hint"] is not None:
        lines += [
            f"Domain classifier agrees with the corpus' `domain_hint` on "
            f"{100 * s['domain_accuracy_vs_hint']:.1f}% of the documents that carry one.",
            "",
        ]
    if s["plans"]:
        total = sum(s["domain_tokens"].values())
        names = list(s["plans"])
        lines += [
            "## Re-mixing",
            "",
            "| domain | tokens | natural | " + " | ".join(names) + " |",
            "|---|---:|---:|" + "---:|" * len(names),
        ]
        for d, t in sorted(s["domain_tokens"].items()):
            cells = []
            for n in names:
                w = s["plans"][n]["weights"].get(d, 0.0)
                e = s["plans"][n]["epochs"].get(d)
                cells.append(f"{100 * w:.1f}%" + (f" ({e:.2f} ep)" if e is not None else ""))
            lines.append(f"| {d} | {t} | {100 * t / total:.1f}% | " + " | ".join(cells) + " |")
        lines.append("")
        for n in names:
            if s["plans"][n].get("missing"):
                lines += [
                    f"Stage {n}: weighted domains with no documents, weight spread over the others: "
                    f"{', '.join(s['plans'][n]['missing'])}.",
                    "",
                ]
    if s.get("composition"):
        lines += [
            "## Composition (language x domain x content type)",
            "",
            "| language | domain | content type | source | documents | tokens |",
            "|---|---|---|---|---:|---:|",
        ]
        for r in s["composition"]:
            lines.append(
                f"| {r['language']} | {r['domain']} | {r['content_type']} | {r['source']} | "
                f"{r['documents']} | {r['tokens']} |"
            )
        lines.append("")
    syn = s.get("synthetic_share")
    if syn:
        lines += [
            f"Synthetic share of the annotated tokens: {100 * syn['total']:.1f}% (cap per domain "
            f"{100 * syn['cap']:.0f}%, `remix.synthetic_max_share`); by domain: "
            + ", ".join(f"{d} {100 * v:.1f}%" for d, v in syn["by_domain"].items() if v > 0),
            "",
        ]
    for title, f in s["plots"].items():
        lines += [f"![{title}]({f})", ""]
    return "\n".join(lines)
