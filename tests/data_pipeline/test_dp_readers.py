"""Every input format goes through the pipeline's read step (the filter stage), malformed records counted.

Each format holds the same good records plus the malformed ones that format can express; the read
step's stats (in the filter marker) must count each under its reason, and the run must not stop.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from megaqwen.data_pipeline.config import PipelineConfig
from megaqwen.data_pipeline.executor import load_markers
from megaqwen.data_pipeline.io import read_documents
from megaqwen.data_pipeline.pipeline import run_stage

GOOD = [
    {"id": "a", "text": "The first document talks about rivers and hills.", "source": "x"},
    {"id": "b", "text": "A second one is about bread, flour and yeast.", "source": "y"},
    {"id": "c", "text": "Third: a note on prime numbers and Euclid.", "source": "z"},
]
# records with a `text` field of the wrong type or none: expressible in every format
BAD_RECORDS = [
    {"id": "n", "text": None, "source": "x"},  # a null in a columnar file
    {"id": "m", "text": 42, "source": "x"},  # jsonl only (a column has one type)
    {"id": "k", "body": "no text key", "source": "x"},  # jsonl only (columnar: text is null)
]


def _jsonl_lines() -> list[str]:
    lines = [json.dumps(r) for r in GOOD[:2]]
    lines += ['{"id": "broken", "text": "unterminated', "[1, 2, 3]"]  # invalid JSON, not an object
    lines += [json.dumps(r) for r in BAD_RECORDS] + [json.dumps(GOOD[2]), ""]
    return lines


JSONL_REASONS = {
    "malformed:invalid_json": 1,
    "malformed:not_an_object": 1,
    "malformed:text_is_NoneType": 1,
    "malformed:text_is_int": 1,
    "malformed:missing_text": 1,
}
COLUMN_REASONS = {"malformed:text_is_NoneType": 1}


def _write(fmt: str, root: Path) -> tuple[Path, dict[str, int]]:
    """The input for `fmt` under `root`, and the malformed reasons the read step must count."""
    if fmt in ("jsonl.gz", "jsonl.zst"):
        data = ("\n".join(_jsonl_lines()) + "\n").encode()
        p = root / f"in.{fmt}"
        if fmt == "jsonl.gz":
            p.write_bytes(gzip.compress(data))
        else:
            import zstandard

            p.write_bytes(zstandard.ZstdCompressor().compress(data))
        return p, JSONL_REASONS
    rows = GOOD[:2] + [BAD_RECORDS[0]] + GOOD[2:]
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        p = root / "in.parquet"
        pq.write_table(pa.Table.from_pylist(rows), p, row_group_size=2)  # several row groups
        return p, COLUMN_REASONS
    assert fmt == "hf"
    datasets = pytest.importorskip("datasets", reason="the HF-folder test writes with `datasets`")
    p = root / "hf_dataset"
    datasets.Dataset.from_list(rows).save_to_disk(str(p))
    return p, COLUMN_REASONS


def _read_step(tmp_path: Path, inputs: list[str]) -> tuple[PipelineConfig, list[dict]]:
    cfg = PipelineConfig()
    cfg.input.paths = inputs
    cfg.output_dir = str(tmp_path / "out")
    cfg.steps = [{"name": "normalize"}]
    cfg.validate()
    run_stage(cfg, "filter", progress=False)
    return cfg, load_markers(cfg.out, "filter")


@pytest.mark.parametrize("fmt", ["parquet", "hf", "jsonl.gz", "jsonl.zst"])
def test_read_step_reads_format_and_counts_malformed(tmp_path: Path, fmt: str):
    path, reasons = _write(fmt, tmp_path)
    cfg, markers = _read_step(tmp_path, [str(path)])
    assert len(markers) == 1
    read = markers[0]["steps"][0]
    assert read["name"] == "read"
    assert read["reasons"] == reasons  # each malformed record counted under its reason, run not stopped
    assert read["removed"] == sum(reasons.values()) and read["kept"] == len(GOOD)
    assert read["seen"] == read["kept"] + read["removed"]
    docs = list(read_documents(cfg.out / "filtered" / "00000.jsonl.zst"))
    assert [(d.id, d.text) for d in docs] == [(r["id"], r["text"]) for r in GOOD]
    assert [d.metadata["source"] for d in docs] == ["x", "y", "z"]  # other fields kept as metadata


def test_hf_dataset_dict_folder_and_glob_of_mixed_formats(tmp_path: Path):
    """A DatasetDict folder (one sub-folder per split) is one input; a glob mixes it with files."""
    datasets = pytest.importorskip("datasets", reason="the HF-folder test writes with `datasets`")
    (tmp_path / "in").mkdir()
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(GOOD[:2]), "test": datasets.Dataset.from_list(GOOD[2:])}
    )
    dd.save_to_disk(str(tmp_path / "in" / "dd"))
    _write("parquet", tmp_path / "in")
    cfg, markers = _read_step(tmp_path, [str(tmp_path / "in" / "*")])
    assert [Path(m["input"].split("[")[0]).name for m in markers] == ["dd", "in.parquet"]
    ids = [d.id for d in read_documents(cfg.out / "filtered" / "00000.jsonl.zst")]
    assert sorted(ids) == ["a", "b", "c"]  # both splits


def test_truncated_compressed_file_is_counted_not_fatal(tmp_path: Path):
    """A cut-off .gz (an interrupted copy) keeps the records before the cut and counts the damage."""
    data = gzip.compress(("\n".join(json.dumps(r) for r in GOOD * 200) + "\n").encode())
    p = tmp_path / "cut.jsonl.gz"
    p.write_bytes(data[: len(data) // 2])
    cfg, markers = _read_step(tmp_path, [str(p)])
    read = markers[0]["steps"][0]
    assert read["reasons"] == {"malformed:truncated_file": 1}
    assert 0 < read["kept"] < 600 and markers[0]["kept"] == read["kept"]


def test_parquet_without_text_column_names_file_and_columns(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "x.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "a", "content": "hello"}]), p)
    with pytest.raises(ValueError, match=r"x\.parquet.*'text'.*content"):
        _read_step(tmp_path, [str(p)])


def test_damaged_zstd_frame_is_counted_not_fatal(tmp_path: Path):
    """A .zst with damaged bytes in the middle (not just cut short) ends that file, not the task."""
    zstandard = pytest.importorskip("zstandard")
    data = bytearray(zstandard.ZstdCompressor().compress((json.dumps(GOOD[0]) + "\n").encode() * 5000))
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
    p = tmp_path / "bad.jsonl.zst"
    p.write_bytes(bytes(data))
    _, markers = _read_step(tmp_path, [str(p)])
    assert markers[0]["steps"][0]["reasons"].get("malformed:truncated_file") == 1


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_reader_progress_counts_input_bytes(tmp_path: Path, suffix: str):
    """Progress is in bytes of the file as stored (compressed), so it ends at the file's size."""
    from megaqwen.data_pipeline.io import Reader, expand_inputs

    raw = ("\n".join(json.dumps({"text": f"doc {i} " * 20}) for i in range(3000)) + "\n").encode()
    p = tmp_path / f"in{suffix}"
    if suffix.endswith(".gz"):
        raw = gzip.compress(raw)
    elif suffix.endswith(".zst"):
        raw = pytest.importorskip("zstandard").ZstdCompressor().compress(raw)
    p.write_bytes(raw)
    parts = expand_inputs([str(p)], parts_per_file=3)
    reader = Reader()
    seen = []
    for part in parts:
        for i, _ in enumerate(reader.read(part)):
            if i % 500 == 0:
                seen.append(reader.bytes_read)
    assert seen == sorted(seen) and all(0 <= b <= len(raw) for b in seen)
    assert reader.bytes_read == len(raw) == sum(part.nbytes for part in parts)
    assert reader.stats.kept == 3000
