"""Web input throughput and extraction quality: ours (trafilatura / resiliparse) vs DataTrove's extractor.

    nice -n 10 python benchmarks/bench_web.py --mb 100 --sample 400 --workers 2 [--json out.json]

Input: synthetic HTML news pages generated here (article text from `make_web_eval_corpus`'s sentence
templates, wrapped in what real pages carry: scripts, styles, a cookie banner, a navigation menu of
~80 links, related-story lists, a comment section, a footer), written as 2 uncompressed WARC files of
`--mb / 2` MB each. Not Common Crawl: real pages vary more in size and markup; the figures compare
extractors on identical input, they do not predict Common Crawl throughput.

1. Extraction alone, one process, on the first `--sample` pages: docs/s, MB of HTML/s, yield (text
   bytes / HTML bytes), and quality: the share of pages whose every article sentence is in the text
   (recall) and whose text holds no planted boilerplate string (precision). Extractors: trafilatura
   as our `html_extract` runs it (fast=True, comments kept), trafilatura full cascade (fast=False),
   resiliparse (main_content=True), and DataTrove's `Trafilatura` extractor (its `extract`, as its
   pipeline calls it: favor_precision, no comments, deduplicate).
2. Whole input on `--workers` processes: our filter stage (WARC reading, url_filter, html_extract,
   content type, every filter, MinHash signatures: the shipped sample config's steps), docs/s; and
   DataTrove's pipeline (WarcReader -> Trafilatura -> GopherQuality -> JsonlWriter) when its WarcReader
   can run (it needs faust-cchardet and python-magic + libmagic).
3. Every stage (filter .. report) on the first `--whole-mb` MB (one WARC file): the whole pipeline's
   docs/s. The domain stages (MiniLM teacher, annotate) dominate it.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from megaqwen.data_pipeline.samples.make_web_eval_corpus import FORUM_LINES, _sentences

BOILER = [
    "Accept all cookies",
    "Subscribe to our newsletter",
    "Most read this week",
    "Sign in to comment",
    "All rights reserved",
]
TOPICS = ["Politics", "Business", "Science", "Sport", "Culture", "Travel", "Health", "Opinion"]


def make_page(rng: random.Random, i: int) -> tuple[str, list[str]]:
    sents = _sentences("en", rng, 6)  # (6 templates: more sentences would repeat 5-grams)
    paras = [" ".join(sents[:3]), " ".join(sents[3:])]
    nav = "".join(f"<li><a href='/{t.lower()}/{j}'>{t} {j}</a></li>" for t in TOPICS for j in range(10))
    related = "".join(
        f"<li><a href='/story/{rng.randint(1, 10**6)}'>{BOILER[2]}: story {j}</a></li>" for j in range(12)
    )
    comments = "".join(f"<div class='comment'><p>{c}</p></div>" for c in rng.sample(FORUM_LINES, 3))
    script = "<script>window.dataLayer=window.dataLayer||[];" + "function g(){dataLayer.push(arguments)}" * 40
    html = (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Story {i}</title>"
        f"{script}</script>"
        f"<style>{'.c{margin:0;padding:0}' * 60}</style></head><body>"
        f"<div class='cookie-banner'><p>We use cookies. {BOILER[0]}</p><button>OK</button></div>"
        f"<header><nav><ul>{nav}</ul></nav></header><main><article><h1>Story {i}</h1>"
        + "".join(f"<p>{p}</p>" for p in paras)
        + f"</article><section class='comments'><h3>{BOILER[3]}</h3>{comments}</section></main>"
        f"<aside><h3>{BOILER[2]}</h3><ul>{related}</ul></aside>"
        f"<footer><p>{BOILER[1]}</p><p>© 2024 Example Media. {BOILER[4]}.</p></footer></body></html>"
    )
    return html, paras


def write_warcs(root: Path, mb: float, files: int = 2, seed: int = 0) -> tuple[list[Path], list[tuple]]:
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths, sample, i = [], [], 0
    for f in range(files):
        p = root / f"crawl-{f:05d}.warc"
        paths.append(p)
        with open(p, "wb") as fh:
            w = WARCWriter(fh, gzip=False)
            while fh.tell() < mb * 1e6 / files:
                html, paras = make_page(rng, i)
                if len(sample) < 2000:
                    sample.append((html, paras))
                http = StatusAndHeaders(
                    "200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1"
                )
                w.write_record(
                    w.create_warc_record(
                        f"https://news.example.com/story/{i}",
                        "response",
                        payload=io.BytesIO(html.encode()),
                        http_headers=http,
                    )
                )
                i += 1
    return paths, sample


def extractors() -> dict:
    from megaqwen.data_pipeline.steps.html import extract_resiliparse, extract_trafilatura

    out = {
        "trafilatura fast (ours, default)": lambda h: extract_trafilatura(h, None, True, True),
        "trafilatura full cascade": lambda h: extract_trafilatura(h, None, True, False),
        "resiliparse": lambda h: extract_resiliparse(h, None, True),
    }
    try:
        from datatrove.pipeline.extractors import Trafilatura

        dt = Trafilatura(favour_precision=True, timeout=10)
        out["datatrove Trafilatura"] = lambda h: dt.extract(h) or ""
    except ImportError:
        print("datatrove not installed (pip install -e .[bench]): its extractor is left out", file=sys.stderr)
    return out


def bench_extract(sample: list[tuple]) -> dict:
    res = {}
    for name, fn in extractors().items():
        for h, _ in sample[:3]:  # warm-up (imports, parser set-up) outside the timing
            fn(h)
        t = time.perf_counter()
        texts = [fn(h) for h, _ in sample]
        dt = time.perf_counter() - t
        html_b = sum(len(h.encode()) for h, _ in sample)
        text_b = sum(len(x.encode()) for x in texts)
        recall = sum(all(p in x for p in paras) for x, (_, paras) in zip(texts, sample)) / len(sample)
        # (BOILER[3] heads the comment section, which our extractor keeps on purpose)
        clean = sum(not any(b in x for b in BOILER if b != BOILER[3]) for x in texts) / len(sample)
        res[name] = {
            "docs_per_s": len(sample) / dt,
            "html_mb_per_s": html_b / 1e6 / dt,
            "yield": text_b / html_b,
            "article_complete": recall,
            "no_boilerplate": clean,
        }
        print(
            f"  {name:34s} {len(sample) / dt:7.1f} docs/s {html_b / 1e6 / dt:6.2f} MB/s  yield "
            f"{text_b / html_b:.3f}  article complete {recall:.1%}  boilerplate-free {clean:.1%}",
            flush=True,
        )
    return res


def run_ours(paths: list[Path], out: Path, workers: int, stages: list[str] | None = None) -> dict:
    from megaqwen.data_pipeline.config import CONFIG_DIR, load_config
    from megaqwen.data_pipeline.executor import load_markers
    from megaqwen.data_pipeline.pipeline import enabled_stages, run_stage

    cfg = load_config(
        CONFIG_DIR / "pipeline_sample.yaml",
        {"output_dir": str(out), "workers": workers, "min_mb_per_worker": 0},
    )
    cfg.input.paths = [str(p) for p in paths]
    cfg.validate()
    times = {}
    for stage in stages or enabled_stages(cfg):
        t = time.perf_counter()
        run_stage(cfg, stage, progress=stage == "filter")
        times[stage] = time.perf_counter() - t
        print(f"  ours: {stage:14s} {times[stage]:7.1f} s", flush=True)
    rows: dict[str, dict] = {}  # the filter stage's per-step rows summed over its tasks (markers)
    for m in load_markers(out, "filter"):
        for r in m["steps"]:
            acc = rows.setdefault(r["name"], {"kept": 0, "changes": {}})
            acc["kept"] += r["kept"]
            for k, v in r.get("changes", {}).items():
                acc["changes"][k] = acc["changes"].get(k, 0) + v
    docs = rows["read"]["kept"]
    ch = rows["html_extract"]["changes"]
    kept = sum(m["kept"] for m in load_markers(out, "filter"))
    return {
        "documents": docs,
        "kept_after_filters": kept,
        "stage_s": times,
        "filter_docs_per_s": docs / times["filter"],
        "docs_per_s": docs / sum(times.values()),
        "extraction_yield": ch["text_bytes"] / ch["html_bytes"],
    }


def run_datatrove(paths: list[Path], out: Path, workers: int) -> dict:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.filters import GopherQualityFilter
    from datatrove.pipeline.readers import WarcReader
    from datatrove.pipeline.writers import JsonlWriter

    ex = LocalPipelineExecutor(
        pipeline=[
            WarcReader(str(paths[0].parent), glob_pattern="*.warc"),
            Trafilatura(favour_precision=True),
            GopherQualityFilter(),
            JsonlWriter(str(out / "output")),
        ],
        tasks=len(paths),
        workers=workers,
        logging_dir=str(out / "logs"),
    )
    t = time.perf_counter()
    ex.run()
    dt = time.perf_counter() - t
    n = 0
    for p in (out / "logs" / "stats").glob("*.json"):
        for s in json.loads(p.read_text()):
            if "WarcReader" in s.get("name", "") or "READER" in s.get("name", "").upper():
                n += (
                    s["stats"].get("documents", {}).get("total", 0)
                    if isinstance(s["stats"].get("documents"), dict)
                    else s["stats"].get("documents", 0)
                )
    return {"seconds": dt, "documents": n, "docs_per_s": n / dt if n else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=100.0, help="MB of HTML input (2 WARC files)")
    p.add_argument("--sample", type=int, default=400, help="pages for the one-process extractor comparison")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--skip-pipelines", action="store_true")
    p.add_argument("--whole-mb", type=float, default=10.0, help="MB for the every-stage run (0: skip)")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_web_"))
    try:
        t = time.perf_counter()
        paths, sample = write_warcs(root / "input", a.mb)
        print(
            f"input: {sum(q.stat().st_size for q in paths) / 1e6:.1f} MB in {len(paths)} WARC files "
            f"({time.perf_counter() - t:.1f} s to generate)",
            flush=True,
        )
        print(f"extraction alone, 1 process, {min(a.sample, len(sample))} pages:", flush=True)
        res = {"input_mb": a.mb, "extract": bench_extract(sample[: a.sample])}
        if not a.skip_pipelines:
            print(f"whole input, {a.workers} workers:", flush=True)
            res["ours_filter"] = ours = run_ours(paths, root / "ours", a.workers, ["filter"])
            print(
                f"  ours: {ours['documents']} pages, filter stage {ours['filter_docs_per_s']:.1f} docs/s, "
                f"{ours['kept_after_filters']} kept, yield {ours['extraction_yield']:.3f}",
                flush=True,
            )
            try:
                res["datatrove"] = dt = run_datatrove(paths, root / "datatrove", a.workers)
                print(
                    f"  datatrove (WarcReader -> Trafilatura -> GopherQuality -> JsonlWriter): "
                    f"{dt['documents']} pages in {dt['seconds']:.1f} s, {dt['docs_per_s']} docs/s"
                )
            except ImportError as e:
                print(f"  datatrove's WarcReader cannot run here: {e}")
        if a.whole_mb > 0 and not a.skip_pipelines:
            small, _ = write_warcs(root / "small", a.whole_mb, files=1, seed=1)
            print(f"every stage, {a.whole_mb:g} MB, {a.workers} workers:", flush=True)
            res["ours_whole"] = w = run_ours(small, root / "whole", a.workers)
            print(
                f"  ours: {w['documents']} pages, whole pipeline {w['docs_per_s']:.1f} docs/s "
                f"(filter stage {w['filter_docs_per_s']:.1f} docs/s)",
                flush=True,
            )
        if a.json:
            a.json.write_text(json.dumps(res, indent=1) + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
