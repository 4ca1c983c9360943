"""Worker processes for a stage's tasks that fail loudly instead of hanging or leaking.

`multiprocessing.Pool` waits forever for a task whose worker was killed (the OOM killer's SIGKILL),
and a `Manager` queue leaves a server process (and semaphores) behind when the parent is killed.
Here each worker is a spawned process talking to the parent over its own pipe (no Manager, no
semaphores):

- a worker that dies fails its task with an error naming the task, its input, the worker's pid and
  the signal; the tasks already running finish and write their markers, no new task starts, and a
  rerun resumes from the markers;
- a worker whose parent dies (even by SIGKILL) exits at once: `PR_SET_PDEATHSIG` on Linux, and a
  watchdog thread that checks the parent pid every second everywhere.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

PR_SET_PDEATHSIG = 1


class TaskError(RuntimeError):
    """One or more tasks of a stage failed (raised, or their worker died); markers of the rest stand."""


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(1.0)

    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="parent-watchdog").start()


def _worker_main(conn, fn: Callable[[int], dict[str, Any]], parent_pid: int, sink_setter) -> None:
    _die_with_parent(parent_pid)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # N workers x N threads would oversubscribe cores
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sink_setter(lambda docs, tokens, nbytes: conn.send(("progress", docs, tokens, nbytes)))
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        t0 = time.perf_counter()
        try:
            result = fn(task)
            result["seconds"] = round(time.perf_counter() - t0, 3)
            conn.send(("done", task, result))
        except Exception as e:  # noqa: BLE001 - sent to the parent, which fails the stage naming the task
            conn.send(("error", task, f"{type(e).__name__}: {e}", traceback.format_exc()))


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = " (SIGKILL: often the out-of-memory killer)" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    return f"exited with code {exitcode}"


def run_in_processes(
    stage: str,
    todo: list[int],
    fn: Callable[[int], dict[str, Any]],
    workers: int,
    on_done: Callable[[int, dict[str, Any]], None],
    on_progress: Callable[[int, int, int], None],
    describe: Callable[[int], str],
    sink_setter: Callable,
) -> None:
    """Run `fn(task)` for every task in `todo` on `workers` spawned processes.

    `on_done(task, result)` runs in the parent as each task finishes (it writes the marker).
    Raises TaskError after the running tasks have finished when any task raised or lost its worker.
    """
    ctx = mp.get_context("spawn")
    queue = deque(todo)
    procs: list[tuple[Any, Any]] = []  # (process, parent end of its pipe)
    busy: dict[int, int] = {}  # worker index -> task it runs
    failures: list[str] = []
    try:
        for _ in range(min(workers, len(todo))):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker_main, args=(child, fn, os.getpid(), sink_setter), daemon=True)
            p.start()
            child.close()
            procs.append((p, parent))

        def dispatch(i: int) -> None:
            busy.pop(i, None)
            if queue and not failures:
                busy[i] = queue.popleft()
                procs[i][1].send(busy[i])

        for i in range(len(procs)):
            dispatch(i)
        while busy:
            waitables = {}
            for i in busy:
                waitables[procs[i][1]] = i
                waitables[procs[i][0].sentinel] = i
            for ready in mp.connection.wait(list(waitables)):
                i = waitables[ready]
                if i not in busy:
                    continue
                p, conn = procs[i]
                msg = None
                if conn.poll():
                    try:
                        msg = conn.recv()
                    except (EOFError, OSError):
                        msg = None
                if msg is None:
                    if p.is_alive():
                        continue
                    p.join()
                    task = busy.pop(i)
                    failures.append(
                        f"task {task} of stage {stage!r} ({describe(task)}) failed: its worker process "
                        f"(pid {p.pid}) {_death(p.exitcode)}"
                    )
                    continue
                kind = msg[0]
                if kind == "progress":
                    on_progress(*msg[1:])
                elif kind == "done":
                    on_done(msg[1], msg[2])
                    dispatch(i)
                else:  # "error"
                    failures.append(
                        f"task {msg[1]} of stage {stage!r} ({describe(msg[1])}) raised {msg[2]}\n{msg[3]}"
                    )
                    dispatch(i)
    finally:
        for p, conn in procs:
            try:
                if p.is_alive():
                    conn.send(None)
            except (OSError, ValueError):
                pass
        for p, conn in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
            conn.close()
    if failures:
        left = f"; {len(queue)} task(s) not started" if queue else ""
        raise TaskError(
            f"{len(failures)} task(s) of stage {stage!r} failed{left} (finished tasks kept their markers; "
            "rerun to resume):\n" + "\n".join(failures)
        )
