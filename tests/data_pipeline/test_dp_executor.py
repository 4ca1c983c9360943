"""Executor faults: a killed worker fails its task by name and the run resumes; a killed parent takes
its workers with it and leaves no Manager process or leaked semaphore."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from megaqwen.data_pipeline.executor import done_tasks, run_tasks
from megaqwen.data_pipeline.process_pool import TaskError

HELPERS = '''
import os, signal, time
from pathlib import Path

def task(out, kill, sleep, t):
    """Write out/<t>.pid, then sleep; task `kill` SIGKILLs its own worker (as the OOM killer would)."""
    Path(out, f"{t}.pid").write_text(str(os.getpid()))
    if t == kill:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(sleep)
    Path(out, f"{t}.out").write_text("done")
    return {"task": t, "pid": os.getpid()}


def divide(t):
    return {"v": 1 / (t - 1)}
'''


@pytest.fixture
def helpers(tmp_path, monkeypatch):
    (tmp_path / "dp_exec_helpers.py").write_text(HELPERS)
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned workers get the parent's sys.path
    import importlib

    return importlib.import_module("dp_exec_helpers")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped) is not alive
        return f.read().split()[2] != "Z"


def test_killed_worker_fails_its_task_by_name_and_the_run_resumes(tmp_path, helpers):
    import functools

    out = tmp_path / "work"
    out.mkdir()
    fn = functools.partial(helpers.task, str(out), 2, 0.2)
    t0 = time.time()
    with pytest.raises(TaskError) as e:
        run_tasks(
            "filter",
            5,
            fn,
            tmp_path / "run",
            workers=2,
            progress=False,
            describe=lambda t: f"input part-{t}.jsonl",
        )
    msg = str(e.value)
    assert "task 2 of stage 'filter' (input part-2.jsonl)" in msg and "killed by SIGKILL" in msg, msg
    assert time.time() - t0 < 60  # failed, did not hang
    done = done_tasks(tmp_path / "run", "filter")
    assert 2 not in done and done  # the other finished tasks kept their markers
    fixed = functools.partial(helpers.task, str(out), -1, 0.0)
    ran = run_tasks("filter", 5, fixed, tmp_path / "run", workers=2, progress=False)
    assert sorted(ran) == sorted(set(range(5)) - done) and 2 in ran
    assert done_tasks(tmp_path / "run", "filter") == set(range(5))


def test_a_raising_task_is_named_with_its_traceback(tmp_path, helpers):
    # the task lives in an importable helper module: a spawned worker cannot import a test module
    # (pytest's importlib mode gives it no importable name)
    with pytest.raises(TaskError, match=r"task 1 of stage 'x' \(task 1\) raised ZeroDivisionError"):
        run_tasks("x", 3, helpers.divide, tmp_path, workers=2, progress=False)


PARENT = textwrap.dedent("""
    import functools, sys
    sys.path.insert(0, sys.argv[1])
    import dp_exec_helpers
    from pathlib import Path
    from megaqwen.data_pipeline.executor import run_tasks
    if __name__ == "__main__":
        fn = functools.partial(dp_exec_helpers.task, sys.argv[2], -1, 120.0)
        run_tasks("filter", 2, fn, Path(sys.argv[3]), workers=2, progress=False)
""")


def test_killed_parent_takes_its_workers_along(tmp_path, helpers):
    out = tmp_path / "work"
    out.mkdir()
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), str(out), str(tmp_path / "run")],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while len(list(out.glob("*.pid"))) < 2 and time.time() < deadline:
        time.sleep(0.1)
    pids = [int(p.read_text()) for p in out.glob("*.pid")]
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 15
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), "workers outlived their killed parent"
    time.sleep(1.0)
    assert not list(out.glob("*.out")) and not done_tasks(tmp_path / "run", "filter")  # nothing written after
    children = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True).stdout.split()
    for pid in children:  # e.g. multiprocessing's resource tracker: it exits once its pipe closes
        deadline = time.time() + 10
        while _alive(int(pid)) and time.time() < deadline:
            time.sleep(0.1)
    assert not [p for p in children if _alive(int(p))], "a helper process (Manager?) was left running"
    err = proc.stderr.read()
    assert "leaked semaphore" not in err and "leaked shared_memory" not in err, err
