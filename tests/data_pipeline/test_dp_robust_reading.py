"""One bad line never loses the run nor a good record: surrogates, invalid bytes, failing steps."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from megaqwen.data.indexed import IndexedDataset
from megaqwen.data.readers import InputPart, Reader, fix_surrogates
from megaqwen.data_pipeline.cli import main
from megaqwen.data_pipeline.config import PipelineConfig
from megaqwen.data_pipeline.document import Document
from megaqwen.data_pipeline.executor import load_markers
from megaqwen.data_pipeline.io import read_documents
from megaqwen.data_pipeline.pipeline import run_stage
from megaqwen.data_pipeline.steps.base import Step

GOOD = "The river rises in the hills north of the town and flows south for forty kilometres."
LINES = [
    json.dumps({"id": "ok", "text": GOOD}).encode(),
    b'{"id": "lone", "text": "emoji half \\ud83d here. ' + GOOD.encode() + b'"}',
    b'{"id": "pair", "text": "a whole \\ud83d\\ude00 emoji. ' + GOOD.encode() + b'"}',
    b'{"id": "latin1", "text": "caf\xe9 cr\xe8me. ' + GOOD.encode() + b'"}',  # not UTF-8
    b'{"id": "meta", "text": "' + GOOD.encode() + b'", "title": "\\udc00 lone low"}',
]


def test_fix_surrogates_joins_pairs_and_replaces_lone_ones():
    assert fix_surrogates("a\ud83d\ude00b") == ("a😀b", 0)
    assert fix_surrogates("x\ud83dy") == ("x\ufffdy", 1)
    assert fix_surrogates("plain") == ("plain", 0)


def test_reader_repairs_instead_of_dropping(tmp_path: Path):
    p = tmp_path / "in.jsonl"
    p.write_bytes(b"\n".join(LINES) + b"\n")
    r = Reader()
    docs = {d.id: d for d in r.read(InputPart(str(p)))}
    assert set(docs) == {"ok", "lone", "pair", "latin1", "meta"}
    assert docs["lone"].text.startswith("emoji half \ufffd here.")
    assert "😀" in docs["pair"].text
    assert docs["latin1"].text.startswith("caf\ufffd cr\ufffdme.")
    assert docs["meta"].metadata["title"] == "\ufffd lone low"
    for d in docs.values():
        d.text.encode("utf-8")  # every string is encodable now
        json.dumps(d.metadata, ensure_ascii=False).encode("utf-8")
    assert r.stats.repairs == {"lone_surrogate": 2, "invalid_utf8": 1}
    assert r.stats.modified == 3 and r.stats.removed == 0


def test_byte_range_parts_report_file_line_numbers(tmp_path: Path, caplog):
    p = tmp_path / "big.jsonl"
    lines = [json.dumps({"id": str(i), "text": GOOD}) for i in range(40)]
    lines[33] = "{broken"
    p.write_text("\n".join(lines) + "\n")
    r = Reader()
    with caplog.at_level(logging.DEBUG, logger="megaqwen.data.readers"):
        ids = [d.id for k in range(4) for d in r.read(InputPart(str(p), k, 4))]
    assert ids == [str(i) for i in range(40) if i != 33]
    assert f"{p}:34: malformed line skipped" in caplog.text  # the file's line, not the part's
    assert f"{p}[3/4]: 1 malformed line skipped (invalid_json 1) at line 34" in caplog.text
    sources = {d.id: d.source for k in range(4) for d in Reader().read(InputPart(str(p), k, 4))}
    assert sources["39"] == f"{p}:40"


def test_tokenize_survives_surrogates_and_invalid_bytes(tmp_path: Path, capsys):
    p = tmp_path / "in.jsonl"
    p.write_bytes(b"\n".join(LINES) + b"\n")
    rc = main(["tokenize", "--input", str(p), "--output-prefix", str(tmp_path / "s")])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and out["documents"] == 5 and out["failed"] == 0
    assert out["repaired"] == {"lone_surrogate": 2, "invalid_utf8": 1}
    assert len(IndexedDataset(tmp_path / "s")) == 5


class _Explode(Step):
    """Test step: raises on documents whose text mentions 'boom'."""

    name = "test_explode"

    @dataclass
    class Config:
        pass

    def process(self, doc: Document) -> str | None:
        if "boom" in doc.text:
            raise RuntimeError("exploded on purpose")
        return None


def test_pipeline_filter_survives_bad_lines_and_a_failing_step(tmp_path: Path, caplog):
    p = tmp_path / "in.jsonl"
    p.write_bytes(b"\n".join(LINES + [json.dumps({"id": "bad", "text": GOOD + " boom"}).encode()]) + b"\n")
    cfg = PipelineConfig()
    cfg.input.paths, cfg.output_dir = [str(p)], str(tmp_path / "out")
    cfg.steps = [{"name": "normalize"}, {"name": "test_explode"}, {"name": "pii"}]
    cfg.dedup.minhash = False
    with caplog.at_level(logging.WARNING):
        run_stage(cfg, "filter", progress=False)
    kept = {d.id for d in read_documents(cfg.out / "filtered" / "00000.jsonl.zst")}
    assert kept == {"ok", "lone", "pair", "latin1", "meta"}
    steps = {s["name"]: s for s in load_markers(cfg.out, "filter")[0]["steps"]}
    assert steps["errors"]["reasons"] == {"test_explode:error_RuntimeError": 1}
    assert steps["read"]["changes"] == {"invalid_utf8": 1, "lone_surrogate": 2}
    assert f"{p}:6 (id bad): test_explode failed" in caplog.text  # file, line and id
    removed = list(read_documents(cfg.out / "removed" / "00000.jsonl.zst"))
    assert [d.metadata["removed_by"] for d in removed] == ["test_explode:error_RuntimeError"]
