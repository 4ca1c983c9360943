"""A file with many bad lines costs the console one summary line, not a warning per line."""

import json
import logging

from megaqwen.data.readers import MAX_EXAMPLES, InputPart, Reader, SkipSummary


def _read(path, caplog) -> tuple[list[str], list[logging.LogRecord]]:
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="megaqwen.data.readers"):
        ids = [d.id for d in Reader().read(InputPart(str(path)))]
    return ids, list(caplog.records)


def test_many_bad_lines_make_one_warning_and_a_few_debug_examples(tmp_path, caplog):
    lines = []
    for i in range(60):  # 12 broken JSON, 8 without text, 40 good
        lines.append("{cut" if i % 5 == 0 else json.dumps({"id": str(i)} if i % 5 == 1 and i < 40
                                                            else {"id": str(i), "text": "ok"}))
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    ids, records = _read(path, caplog)
    assert len(ids) == 40
    warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert warnings == [f"{path}: 20 malformed lines skipped (invalid_json 12, missing_text 8) "
                        "at lines 1, 2, 6, 7, 11, ..."]
    debug = [r.getMessage() for r in records if r.levelno == logging.DEBUG]
    assert len(debug) == MAX_EXAMPLES and debug[0] == f"{path}:1: malformed line skipped: invalid_json " \
        "(Expecting property name enclosed in double quotes)"


def test_clean_file_logs_nothing_and_repairs_alone_are_info(tmp_path, caplog):
    path = tmp_path / "clean.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n")
    assert _read(path, caplog)[1] == []
    path.write_bytes(b'{"text": "caf\xe9"}\n{"text": "fine"}\n')  # Latin-1: kept with U+FFFD
    ids, records = _read(path, caplog)
    assert len(ids) == 2
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.INFO, f"{path}: 1 record kept after repair (invalid_utf8 1)")]


def test_skip_summary_is_usable_by_other_readers(caplog):
    """The eval CLI's jsonl reader counts its own reasons with the same summary."""
    skips = SkipSummary("docs.jsonl", logging.getLogger("megaqwen.eval"))
    assert skips.summary() is None
    skips.skip("docs.jsonl:3", "no_text_or_input_ids", unit="row")
    with caplog.at_level(logging.WARNING, logger="megaqwen.eval"):
        skips.report()
    assert caplog.messages == ["docs.jsonl: 1 malformed row skipped (no_text_or_input_ids 1) at row 3"]
