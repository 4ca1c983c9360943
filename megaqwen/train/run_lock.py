"""One job per run folder: `OUT_DIR/run.lock` names the process that writes the folder.

The lock file is created with O_EXCL and holds the holder's pid, host, process start time, command
line and start date. Its holder refreshes the file's mtime every step. A lock is stale, and taken
over with a warning, when its holder is gone: on the same host the pid no longer runs (or now belongs
to a process started later); on another host the lock has not been refreshed for
`train.lock_timeout_min` minutes (a requeued SLURM job lands on a new node). Anything else stops the
new job with a message naming the holder.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from megaqwen.train.errors import UsageError

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


def _proc_start(pid: int) -> str | None:
    """Start time of a process in clock ticks since boot (field 22 of /proc/PID/stat), Linux only."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class RunLock:
    def __init__(self, out_dir: str | Path, timeout_min: float = 60.0):
        self.path = Path(out_dir) / LOCK_NAME
        self.timeout_s = timeout_min * 60
        self.held = False

    def me(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": _proc_start(os.getpid()),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv}

    def holder(self) -> dict[str, Any] | None:
        """The lock file's contents; {} while another process is still writing it; None if absent."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return {}

    def _is_mine(self, h: dict[str, Any]) -> bool:
        return h.get("host") == socket.gethostname() and h.get("pid") == os.getpid()

    def stale_reason(self, h: dict[str, Any]) -> str | None:
        """Why the lock's holder is gone, or None when it may still be running."""
        age = time.time() - self.path.stat().st_mtime
        if not h:
            return "the lock file is empty or unreadable" if age > 60 else None
        if h.get("host") == socket.gethostname():
            pid = int(h.get("pid", -1))
            if not _pid_alive(pid):
                return f"process {pid} no longer runs"
            start = _proc_start(pid)
            if h.get("proc_start") and start and start != h["proc_start"]:
                return f"pid {pid} now belongs to another process"
            return None
        if age > self.timeout_s:
            return f"not refreshed for {age / 60:.0f} min (train.lock_timeout_min={self.timeout_s / 60:g})"
        return None

    def check(self) -> None:
        """UsageError if a live job other than this process holds the lock (takes nothing)."""
        h = self.holder()
        if h is None or self._is_mine(h):
            return
        if self.stale_reason(h) is None:
            raise UsageError(self.busy_message(h))

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                h = self.holder()
                if h is None:
                    continue  # released between our open and our read
                if not self._is_mine(h):
                    reason = self.stale_reason(h)
                    if reason is None:
                        raise UsageError(self.busy_message(h)) from None
                    log.warning("taking over the stale lock %s of pid %s on %s: %s", self.path,
                                h.get("pid"), h.get("host"), reason)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.me(), f)
            self.held = True
            atexit.register(self.release)
            return
        raise UsageError(f"could not take the lock {self.path}: other processes keep creating it")

    def refresh(self) -> None:
        """Touch the lock (its mtime says the holder is alive to jobs on other hosts)."""
        if self.held:
            os.utime(self.path)

    def release(self) -> None:
        if not self.held:
            return
        h = self.holder()
        if h is not None and self._is_mine(h):
            self.path.unlink(missing_ok=True)
        self.held = False

    def busy_message(self, h: dict[str, Any]) -> str:
        age = (time.time() - self.path.stat().st_mtime) / 60
        cmd = " ".join(str(a) for a in h.get("argv", [])[:6])
        return (f"run folder {self.path.parent} is in use by pid {h.get('pid')} on host {h.get('host')} "
                f"(started {h.get('started')}, last refreshed {age:.1f} min ago: {cmd} ...). Two jobs "
                f"writing one folder would mix their checkpoints and metrics: wait for it, stop it, or "
                f"use another train.out_dir; if that job is gone, delete {self.path}")
