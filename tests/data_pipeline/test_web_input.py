"""Web input: WARC files (written here with warcio) through the whole pipeline into shards; HTML in
jsonl fields; URL block lists; damaged WARC records counted and named, never fatal."""

from __future__ import annotations

import gzip
import io
import json
import logging
import random
from pathlib import Path

import pytest
import yaml

pytest.importorskip("warcio", reason="web input needs warcio (the `data` extra)")
pytest.importorskip("trafilatura", reason="html_extract needs trafilatura (the `data` extra)")

from warcio.statusandheaders import StatusAndHeaders  # noqa: E402
from warcio.warcwriter import WARCWriter  # noqa: E402

from megaqwen.data_pipeline.config import PipelineConfig, StageMix  # noqa: E402
from megaqwen.data_pipeline.document import Document  # noqa: E402
from megaqwen.data_pipeline.io import Reader, expand_inputs, read_documents  # noqa: E402
from megaqwen.data_pipeline.pipeline import run_pipeline  # noqa: E402
from megaqwen.data_pipeline.samples.make_web_eval_corpus import _sentences  # noqa: E402
from megaqwen.data_pipeline.steps.base import build_steps  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
STEPS = yaml.safe_load((REPO / "data_pipeline/configs/pipeline_sample.yaml").read_text())["steps"]
BOILERPLATE = [
    "Accept all cookies",
    "Home | News | Sport | Contact",
    "Subscribe to our newsletter",
    "Related stories you may have missed",
]


def page(title: str, paragraphs: list[str], lang: str = "en") -> str:
    body = "".join(f"<p>{p}</p>" for p in paragraphs)
    return (
        f"<!DOCTYPE html><html lang='{lang}'><head><meta charset='utf-8'><title>{title}</title>"
        f"<script>var tracking = 1;</script><style>p {{ margin: 0 }}</style></head><body>"
        f"<div id='cookie-banner' class='cookie consent'><p>We use cookies. {BOILERPLATE[0]}</p></div>"
        f"<nav><ul><li><a href='/'>{BOILERPLATE[1]}</a></li></ul></nav>"
        f"<main><article><h1>{title}</h1>{body}</article></main>"
        f"<aside class='related'><h3>{BOILERPLATE[3]}</h3>"
        f"<ul><li><a href='/x'>Another story</a></li></ul></aside>"
        f"<footer><p>{BOILERPLATE[2]}</p><p>© 2024 Example News</p></footer></body></html>"
    )


def article(rng: random.Random) -> list[str]:
    s = _sentences("en", rng, 6)
    return [" ".join(s[:3]), " ".join(s[3:])]


def write_warc(path: Path, records: list[tuple[str, str, bytes, str]]) -> None:
    """records: (warc type, url, body, content type)."""
    with open(path, "wb") as f:
        w = WARCWriter(f, gzip=path.name.endswith(".gz"))
        for kind, url, body, ctype in records:
            if kind == "response":
                status = "404 Not Found" if url.endswith("/missing") else "200 OK"
                http = StatusAndHeaders(status, [("Content-Type", ctype)], protocol="HTTP/1.1")
                rec = w.create_warc_record(
                    url,
                    "response",
                    payload=io.BytesIO(body),
                    http_headers=http,
                    warc_headers_dict={"WARC-Date": "2024-03-01T10:00:00Z"},
                )
            else:
                rec = w.create_warc_record(url, kind, payload=io.BytesIO(body))
            w.write_record(rec)


def _cfg(tmp: Path, inputs: list[str], steps) -> PipelineConfig:
    cfg = PipelineConfig()
    cfg.input.paths = inputs
    cfg.output_dir = str(tmp / "out")
    cfg.steps = steps
    cfg.domains.student = False  # zero-shot MiniLM on each of the few documents
    cfg.scorer.max_length, cfg.scorer.batch_size = 32, 16
    cfg.remix.stages = [StageMix(name="s", seq_length=64, token_budget=2000, max_epochs=4)]
    cfg.validate()
    return cfg


def test_warc_through_the_pipeline_into_shards(tmp_path: Path):
    rng = random.Random(3)
    arts = {f"https://news.example.org/story-{i}": article(rng) for i in range(8)}
    recs = [("request", url, b"GET / HTTP/1.1\r\n\r\n", "") for url in list(arts)[:1]]
    recs += [
        ("response", url, page(f"Story {i}", ps).encode(), "text/html; charset=utf-8")
        for i, (url, ps) in enumerate(arts.items())
    ]
    recs += [
        ("response", "https://news.example.org/logo.png", b"\x89PNG....", "image/png"),  # not HTML: skipped
        ("response", "https://news.example.org/missing", page("Gone", ["x"]).encode(), "text/html"),  # 404
        ("response", "https://www.casino-spam.example/win", page("Win", article(rng)).encode(), "text/html"),
    ]
    good = tmp_path / "crawl-00000.warc.gz"
    write_warc(good, recs)
    # a second file, damaged: its second half is cut off mid gzip member
    damaged = tmp_path / "crawl-00001.warc.gz"
    write_warc(
        damaged,
        [("response", "https://news.example.org/late", page("Late", article(rng)).encode(), "text/html")] * 3,
    )
    data = damaged.read_bytes()
    damaged.write_bytes(data[: len(data) - len(data) // 6])  # (the middle of the third record)

    steps = [{"name": "url_filter", "blocked_domains": ["casino-spam.example"]}] + [
        s for s in STEPS if s["name"] != "url_filter"
    ]
    cfg = _cfg(tmp_path, [str(good), str(damaged)], steps)
    run_pipeline(cfg, progress=False)
    out = cfg.out
    kept = [d for p in (out / "annotated").rglob("*.jsonl.zst") for d in read_documents(p)]
    by_url = {d.metadata["url"]: d for d in kept}
    assert set(arts) <= set(by_url), sorted(by_url)
    for url, paras in arts.items():
        d = by_url[url]
        assert all(p in d.text for p in paras)  # the article is there ...
        assert not any(b in d.text for b in BOILERPLATE)  # ... the page furniture is not
        assert d.metadata["fetch_date"] == "2024-03-01T10:00:00Z" and d.metadata["language_hint"] == "en"
    assert not any("casino" in u for u in by_url)
    # shards hold tokens
    bins = list((out / "shards").glob("*.bin"))
    assert bins and sum(b.stat().st_size for b in bins) > 0
    stats = json.loads((out / "stats.json").read_text())
    rows = {r["name"]: r for r in stats["steps"]["filter"]}
    assert rows["url_filter"]["reasons"] == {"url_filter:blocked_domain": 1}
    # the damaged file: what could be read is read, the damage counted once, nothing fatal
    assert rows["read"]["reasons"].get("malformed:truncated_file") == 1
    yield_ = rows["html_extract"]["changes"]
    assert 0 < yield_["text_bytes"] < yield_["html_bytes"]
    assert "Extraction yield:" in (out / "report" / "report.md").read_text()


def test_damaged_record_is_named_with_file_and_offset(tmp_path: Path, caplog):
    path = tmp_path / "bad.warc"  # uncompressed: the second record's header is garbage
    write_warc(
        path, [("response", "https://a.example/1", page("A", ["Some text here."]).encode(), "text/html")]
    )
    with open(path, "ab") as f:
        f.write(b"WARC/1.0\r\nthis is not a header\r\n\r\n")
    reader = Reader()
    caplog.set_level(logging.DEBUG, logger="megaqwen.data.readers")
    docs = list(reader.read(expand_inputs([str(path)])[0]))
    assert [d.metadata["url"] for d in docs] == ["https://a.example/1"]
    assert reader.stats.reasons["malformed:bad_record"] == 1
    assert f"{path}:{len(path.read_bytes()) - 34}: malformed" in caplog.text  # file:offset of the bad record


def test_html_in_jsonl_field_and_html_files(tmp_path: Path):
    rng = random.Random(5)
    paras = article(rng)
    html = page("In a field", paras)
    src = tmp_path / "pages.jsonl"
    src.write_text(
        json.dumps({"id": "p1", "html": html, "url": "https://b.example/p1"})
        + "\n"
        + json.dumps({"id": "p2", "html": "plain text, not a page"})
        + "\n"
    )
    (tmp_path / "one.html.gz").write_bytes(gzip.compress(page("From a file", paras, lang="de").encode()))
    reader = Reader(text_key="html")
    docs = [d for part in expand_inputs([str(src), str(tmp_path / "one.html.gz")]) for d in reader.read(part)]
    (extract,) = build_steps([{"name": "html_extract"}])
    out = [extract(d) for d in docs]
    assert all(p in out[0].text for p in paras) and "<p>" not in out[0].text
    assert out[1].text == "plain text, not a page"  # not HTML: left alone
    assert all(p in out[2].text for p in paras) and docs[2].metadata["language_hint"] == "de"
    assert extract.stats.changes["html_bytes"] > extract.stats.changes["text_bytes"] > 0


def test_url_filter_lists(tmp_path: Path):
    lst = tmp_path / "adult.txt"
    lst.write_text("# adult list\nwww.adult-site.example\n\nbad.example  # spam\n")
    (f,) = build_steps(
        [{"name": "url_filter", "blocked_domains_file": str(lst), "blocked_url_words": ["xxx"]}]
    )

    def doc(url):
        return Document("d", "text", {"url": url} if url else {})

    assert f(doc("https://adult-site.example/a")) is None and f.last_reason == "url_filter:blocked_domain"
    assert f(doc("http://cdn.bad.example/x?y=1")) is None
    assert f(doc("https://shop.example/xxx-deals")) is None and f.last_reason == "url_filter:blocked_url_word"
    assert f(doc("https://notbad.example/a")) is not None  # a suffix of the name is not the domain
    assert f(doc(None)) is not None
    with pytest.raises(ValueError, match="blocked_domains_file"):
        build_steps([{"name": "url_filter", "blocked_domains_file": str(tmp_path / "missing.txt")}])
    with pytest.raises(ValueError, match="extractor"):
        build_steps([{"name": "html_extract", "extractor": "beautifulsoup"}])
