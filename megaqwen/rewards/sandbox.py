"""Run a candidate Python program and its unit tests in a separate, limited process (the code
verifier of `megaqwen.rewards.code` and `megaqwen-data verify-pairs`).

The child (`sandbox_child.py`, run as `python -I`) gets a fresh temporary working directory, a
minimal environment, its own session (process group), a network namespace and a PID namespace where
the kernel allows them (as root, or via an unprivileged user namespace), an audit hook refusing
sockets either way, and rlimits: CPU seconds (RLIMIT_CPU), address space (RLIMIT_AS), file size
(RLIMIT_FSIZE), no core files, and optionally RLIMIT_NPROC. The parent kills the whole process
group at the wall-clock timeout and again when the child exits, so forked helpers do not outlive
the check.

Not isolated: the filesystem (the child runs as the same user and can read and write what it can),
and, where no PID namespace could be made, a process that calls setsid() to leave the group. For
untrusted code at scale, run this inside a container or a jail (nsjail, bubblewrap) as well.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

CHILD = Path(__file__).with_name("sandbox_child.py")
REASONS = ("passed", "wrong_answer", "exception", "timeout", "memory", "crashed", "no_result")
"""Every reason a check can end with (the failure counts of `verify-pairs` use these names)."""


@dataclass(frozen=True)
class SandboxConfig:
    timeout_s: float = 5.0
    """Wall-clock seconds for the whole child (interpreter start included); then its group is killed."""
    memory_mb: int = 1024
    """Address-space limit of the child in MiB (RLIMIT_AS); a bigger allocation raises MemoryError."""
    file_size_mb: int = 16
    """Largest file the child may write, in MiB (RLIMIT_FSIZE); stdout and stderr count."""
    max_processes: int = 0
    """RLIMIT_NPROC when > 0. It counts all processes of the user, so it is off by default."""
    cpu_seconds: int = 0
    """RLIMIT_CPU in whole seconds; 0: the wall-clock limit rounded up."""

    def __post_init__(self):
        if (self.timeout_s <= 0 or self.memory_mb < 64 or self.file_size_mb < 1 or self.max_processes < 0
                or self.cpu_seconds < 0):
            raise ValueError(
                f"sandbox limits: timeout_s={self.timeout_s} must be > 0, memory_mb={self.memory_mb} >= 64 "
                f"(the interpreter alone maps ~30 MiB), file_size_mb={self.file_size_mb} >= 1, "
                f"max_processes={self.max_processes} and cpu_seconds={self.cpu_seconds} >= 0")

    @property
    def cpu_s(self) -> int:
        """RLIMIT_CPU: by default the wall-clock limit rounded up; CPU time cannot outrun wall time for
        one thread, so this only matters for a multi-threaded spinner. The kernel sends SIGXCPU at
        this limit and SIGKILL a second later (a PID namespace's init ignores SIGXCPU)."""
        return self.cpu_seconds or max(1, math.ceil(self.timeout_s))


@dataclass(frozen=True)
class SandboxResult:
    reason: str
    """One of REASONS."""
    detail: str
    """The exception's last lines, the signal, or the end of stderr; empty when passed."""
    seconds: float
    """Wall-clock time of the child."""
    isolation: str
    """What applied, joined by "+": netns or userns+netns, pidns, audit-hook (always); "unknown" when the
    child sent no result. E.g. "netns+pidns+audit-hook" as root."""

    @property
    def passed(self) -> bool:
        return self.reason == "passed"


def run_python(program: str, tests: str, config: SandboxConfig = SandboxConfig()) -> SandboxResult:
    """Run `program` then `tests` (Python source; asserts) in one namespace inside the sandbox."""
    with tempfile.TemporaryDirectory(prefix="megaqwen-sandbox-") as tmp:
        work = Path(tmp)
        (work / "solution.py").write_text(program, encoding="utf-8")
        (work / "tests.py").write_text(tests, encoding="utf-8")
        nonce = secrets.token_hex(16)
        r, w = os.pipe()
        args = [sys.executable, "-I", str(CHILD), str(w), str(config.cpu_s), str(config.memory_mb),
                str(config.file_size_mb), str(config.max_processes)]
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "LANG": "C.UTF-8", "TMPDIR": tmp}
        start = time.monotonic()
        with open(work / "stdout", "wb") as out, open(work / "stderr", "wb") as err:
            proc = subprocess.Popen(args, cwd=tmp, env=env, stdin=subprocess.PIPE, stdout=out, stderr=err,
                                    pass_fds=(w,), start_new_session=True)
        os.close(w)
        with contextlib.suppress(BrokenPipeError):  # a child that died at start-up
            proc.stdin.write(f"{nonce}\n".encode())
            proc.stdin.close()
        proc.returncode, cpu_s, timed_out = _wait(proc.pid, config.timeout_s)
        seconds = time.monotonic() - start
        report = _read_result(r, nonce)
        stderr = (work / "stderr").read_bytes()[-600:].decode("utf-8", "replace")
    return _classify(proc.returncode, timed_out, cpu_s, report, stderr, seconds, config)


def _wait(pid: int, timeout_s: float) -> tuple[int, float, bool]:
    """Reap the child, killing its group at the deadline and again once it is gone (helpers it forked).
    Returns (exit code as Popen spells it, CPU seconds of the child and the children it reaped, whether
    the deadline killed it)."""
    deadline = time.monotonic() + timeout_s
    timed_out = False
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if not timed_out and time.monotonic() >= deadline:
            timed_out = True
            _kill_group(pid)
        time.sleep(0.005)
    _kill_group(pid)
    return os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime, timed_out


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _read_result(fd: int, nonce: str) -> dict | None:
    """The child's `NONCE{json}`, or None. Non-blocking: an escaped grandchild may hold the pipe open."""
    os.set_blocking(fd, False)
    data = b""
    try:
        while chunk := os.read(fd, 1 << 16):
            data += chunk
    except BlockingIOError:
        pass
    finally:
        os.close(fd)
    text = data.decode("utf-8", "replace")
    if not text.startswith(nonce):
        return None
    try:
        return json.loads(text[len(nonce):])
    except json.JSONDecodeError:
        return None


def _classify(returncode: int, timed_out: bool, cpu_s: float, report: dict | None, stderr: str,
              seconds: float, config: SandboxConfig) -> SandboxResult:
    applied = report["isolation"] if report else "unknown"
    if timed_out:
        return SandboxResult("timeout", f"killed after the {config.timeout_s:g} s wall-clock limit",
                             seconds, applied)
    if returncode < 0:
        sig = signal.Signals(-returncode)
        # SIGXCPU at the soft limit, or SIGKILL at the hard one (a PID namespace's init ignores SIGXCPU)
        if sig in (signal.SIGXCPU, signal.SIGKILL) and cpu_s >= config.cpu_s * 0.95:
            why = f"{sig.name} after {cpu_s:.1f} CPU seconds (limit {config.cpu_s})"
            return SandboxResult("timeout", why, seconds, applied)
        return SandboxResult("crashed", f"killed by {sig.name}; stderr: {stderr[-300:]}", seconds, applied)
    if report is None:
        return SandboxResult("no_result", f"exited with code {returncode} before the tests finished; "
                             f"stderr: {stderr[-300:]}", seconds, applied)
    return SandboxResult(report["reason"], report["detail"], seconds, applied)


@cache
def isolation() -> str:
    """The isolation the sandbox gets on this machine (SandboxResult.isolation of one trivial check)."""
    return run_python("", "", SandboxConfig(timeout_s=10)).isolation
