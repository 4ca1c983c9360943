"""A stage's progress bar and the log lines written while it runs do not share a console line."""

import logging
import sys

from megaqwen.data_pipeline.executor import report_progress, run_tasks

log = logging.getLogger("megaqwen.data_pipeline.test")


def _task(t: int) -> dict:
    report_progress(docs=10, tokens=100, nbytes=50)  # the bar is drawn before the warning
    log.warning("task %d: 3 malformed lines skipped", t)
    report_progress(docs=10, tokens=100, nbytes=50)
    return {"docs": 20}


def test_log_lines_are_written_above_the_bar_not_into_it(tmp_path, capsys):
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)  # as logging.basicConfig in the CLI
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root.addHandler(handler)
    try:
        assert run_tasks("filter", 2, _task, tmp_path, total_bytes=200, progress=True) == [0, 1]
    finally:
        root.removeHandler(handler)
    err = capsys.readouterr().err
    lines = [seg for line in err.split("\n") for seg in line.split("\r")]
    assert [seg for seg in lines if "malformed" in seg] == [f"WARNING task {t}: 3 malformed lines skipped"
                                                           for t in (0, 1)]
    assert any(seg.startswith("filter:") for seg in lines)  # the bar was drawn
    assert root.handlers.count(handler) == 0 and handler.stream is sys.stderr
