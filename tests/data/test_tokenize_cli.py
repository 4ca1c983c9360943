import gzip
import json
import logging

import pytest

from megaqwen.data.indexed import IndexedDataset
from megaqwen.data_pipeline.cli import main
from megaqwen.tokenizer import EOD_ID, load_tokenizer

GOOD = ["Hello world.", "你好，世界！", "def f(x):\n    return x + 1\n", "quoting <|endoftext|> literally"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _jsonl_lines():
    return [
        json.dumps({"text": GOOD[0], "id": 1}),
        "{broken json",
        json.dumps({"text": GOOD[1]}),
        json.dumps({"body": "no text key"}),
        "",
        json.dumps({"text": 42}),
        json.dumps({"text": GOOD[2]}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"text": GOOD[3]}),
        json.dumps({"text": ""}),
    ]


def _run(capsys, *argv):
    rc = main(["tokenize", *map(str, argv)])
    return rc, capsys.readouterr()


def test_jsonl_with_malformed_lines(tmp_path, capsys, caplog, tok):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(_jsonl_lines()) + "\n")
    with caplog.at_level(logging.DEBUG, logger="megaqwen.data.readers"):
        rc, out = _run(capsys, "--input", src, "--output-prefix", tmp_path / "out" / "s")
    assert rc == 0
    summary = json.loads(out.out.strip().splitlines()[-1])
    assert (summary["documents"], summary["malformed"], summary["empty"]) == (4, 4, 1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert [w for w in warnings if "in.jsonl" in w] == [  # one line for the file: counts, reasons, lines
        f"{src}: 4 malformed lines skipped (invalid_json 1, missing_text 1, not_an_object 1, text_is_int 1) "
        "at lines 2, 4, 6, 8"]
    for line in (2, 4, 6, 8):  # and each at DEBUG with file, line number and reason
        assert f"in.jsonl:{line}: malformed line skipped" in caplog.text
    ds = IndexedDataset(tmp_path / "out" / "s")
    docs = [ds[i].tolist() for i in range(len(ds))]
    assert all(d[-1] == EOD_ID and EOD_ID not in d[:-1] for d in docs)  # literal "<|endoftext|>" stays text
    assert [tok.decode(d[:-1]) for d in docs] == GOOD
    assert summary["tokens"] == ds.num_tokens == sum(map(len, docs))
    assert json.loads((tmp_path / "out" / "s.stats.json").read_text())["documents"] == 4


def test_gz_zst_parquet_inputs_and_no_eod(tmp_path, capsys, tok):
    zstandard = pytest.importorskip("zstandard")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    data = "\n".join(json.dumps({"content": t}) for t in GOOD[:2]).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(data))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    pq.write_table(pa.table({"content": [GOOD[2], None, GOOD[3]]}), tmp_path / "c.parquet")
    rc, out = _run(
        capsys,
        "--input",
        tmp_path / "*.jsonl.*",
        tmp_path / "c.parquet",
        "--text-key",
        "content",
        "--output-prefix",
        tmp_path / "s",
        "--no-eod",
    )
    assert rc == 0
    summary = json.loads(out.out.strip().splitlines()[-1])
    assert (summary["files"], summary["documents"], summary["malformed"]) == (3, 6, 1)  # the null row
    ds = IndexedDataset(tmp_path / "s")
    assert [tok.decode(ds[i]) for i in range(len(ds))] == GOOD[:2] + GOOD[:2] + GOOD[2:]
    assert all(ds[i][-1] != EOD_ID for i in range(len(ds)))


def test_workers_give_identical_shards(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(
        "".join(json.dumps({"text": f"doc {i}: " + GOOD[i % 4] * (i % 5)}) + "\n" for i in range(50))
    )
    assert _run(capsys, "--input", src, "--output-prefix", tmp_path / "one", "--batch-size", "7")[0] == 0
    assert (
        _run(
            capsys, "--input", src, "--output-prefix", tmp_path / "two", "--batch-size", "7", "--workers", "2"
        )[0]
        == 0
    )
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"one{ext}").read_bytes() == (tmp_path / f"two{ext}").read_bytes()


def test_no_input_and_no_valid_document_fail_clearly(tmp_path, capsys):
    rc, out = _run(capsys, "--input", tmp_path / "missing*.jsonl", "--output-prefix", tmp_path / "s")
    assert rc == 2 and "no input file matched" in out.err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("nope\n{}\n")
    rc, out = _run(capsys, "--input", bad, "--output-prefix", tmp_path / "s")
    assert rc == 1 and "no valid document" in out.err and "2 malformed" in out.err
    assert not (tmp_path / "s.idx").exists() and not (tmp_path / "s.bin").exists()
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "c.parquet")
    rc, out = _run(capsys, "--input", tmp_path / "c.parquet", "--output-prefix", tmp_path / "s")
    assert rc == 1 and "no column 'text'" in out.err and "c.parquet" in out.err


def test_truncated_compressed_file_is_reported_not_fatal(tmp_path, capsys, caplog):
    data = "".join(json.dumps({"text": f"document number {i} " * 50}) + "\n" for i in range(200)).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(data)[:-200])
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": GOOD[0]}) + "\n")
    with caplog.at_level(logging.ERROR):
        rc, out = _run(
            capsys,
            "--input",
            tmp_path / "a.jsonl.gz",
            tmp_path / "b.jsonl",
            "--output-prefix",
            tmp_path / "s",
        )
    summary = json.loads(out.out.strip().splitlines()[-1])
    assert rc == 0 and summary["corrupt_files"] == [str(tmp_path / "a.jsonl.gz")]
    assert "a.jsonl.gz: unreadable" in caplog.text
    assert 0 < summary["documents"] < 201  # the readable part of a.jsonl.gz, then b.jsonl


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from tests.data.tiny_tokenizer import make_tiny_tokenizer

    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tiny-bpe")


def test_second_tokenizer_is_used_and_recorded(tmp_path, capsys, tiny_folder):
    from transformers import AutoTokenizer

    from megaqwen.data.indexed import read_meta
    from megaqwen.tokenizer import tokenizer_info

    texts = ["hello world", "the lazy dog and the fox"]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    rc, out = _run(capsys, "--input", src, "--output-prefix", tmp_path / "s", "--tokenizer", tiny_folder)
    assert rc == 0, out.err
    theirs = AutoTokenizer.from_pretrained(str(tiny_folder))
    ds = IndexedDataset(tmp_path / "s")
    # exactly the ids the folder's own tokenizer gives, each document closed by its eos token
    assert [ds[i].tolist() for i in range(len(ds))] == [
        theirs.encode(t, add_special_tokens=False) + [theirs.eos_token_id] for t in texts
    ]
    meta = read_meta(tmp_path / "s")
    want = tokenizer_info(str(tiny_folder))
    assert meta["tokenizer"] == want.to_dict() and want.name == "tiny-bpe" and want.size == len(theirs)
    assert want.fingerprint != tokenizer_info().fingerprint  # not the Qwen tokenizer
    assert meta["max_token_id"] == max(int(ds[i].max()) for i in range(len(ds)))
    assert "tiny-bpe" in json.loads(out.out.strip().splitlines()[-1])["tokenizer"]


def test_default_tokenizer_recorded_and_missing_eos_refused(tmp_path, capsys, tok):
    from megaqwen.data.indexed import read_meta
    from megaqwen.tokenizer import tokenizer_info
    from tests.data.tiny_tokenizer import make_tiny_tokenizer

    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": GOOD[0]}) + "\n")
    assert _run(capsys, "--input", src, "--output-prefix", tmp_path / "q")[0] == 0
    meta = read_meta(tmp_path / "q")
    assert meta["tokenizer"]["fingerprint"] == tokenizer_info().fingerprint
    assert (meta["tokenizer"]["name"], meta["tokenizer"]["eod_id"]) == ("Qwen2.5", EOD_ID)
    assert meta["max_token_id"] == EOD_ID  # plain text ids are below the appended <|endoftext|>
    # a Qwen folder saved elsewhere (as an official download would be) is the same tokenizer
    tok.save_pretrained(tmp_path / "qwen-copy")
    assert tokenizer_info(str(tmp_path / "qwen-copy")).fingerprint == meta["tokenizer"]["fingerprint"]
    no_eos = make_tiny_tokenizer(tmp_path / "no-eos", eos=None)
    rc, out = _run(capsys, "--input", src, "--output-prefix", tmp_path / "n", "--tokenizer", no_eos)
    assert rc == 1 and "has no eos token" in out.err and "--no-eod" in out.err
    assert not (tmp_path / "n.bin").exists()
    rc, out = _run(capsys, "--input", src, "--output-prefix", tmp_path / "n", "--tokenizer", no_eos,
                   "--no-eod")
    assert rc == 0, out.err
    assert read_meta(tmp_path / "n")["tokenizer"]["eod_id"] is None
    (empty := tmp_path / "empty").mkdir()
    rc, out = _run(capsys, "--input", src, "--output-prefix", tmp_path / "e", "--tokenizer", empty)
    assert rc == 1 and "not a Hugging Face tokenizer folder" in out.err and len(out.err.splitlines()) == 1
