"""Run a candidate Python program and its unit tests in a separate, limited process.

The child (`sandbox_child.py`, run as `python -I`) gets a fresh temporary working directory, a
minimal environment, its own session (process group), a network namespace where the kernel allows
one (as root, or via an unprivileged user namespace) plus an audit hook refusing sockets either way,
and rlimits: CPU seconds (RLIMIT_CPU), address space (RLIMIT_AS), file size (RLIMIT_FSIZE), no core
files, and optionally RLIMIT_NPROC. The parent kills the whole process group at the wall-clock
timeout and again when the child exits, so forked helpers do not outlive the check.

Not isolated: the filesystem (the child runs as the same user and can read and write what it can)
and a process that calls setsid() to leave the group. For untrusted code at scale, run this inside a
container or a jail (nsjail, bubblewrap) as well.
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

    def __post_init__(self):
        if self.timeout_s <= 0 or self.memory_mb < 64 or self.file_size_mb < 1 or self.max_processes < 0:
            raise ValueError(
                f"sandbox limits: timeout_s={self.timeout_s} must be > 0, memory_mb={self.memory_mb} >= 64 "
                f"(the interpreter alone maps ~30 MiB), file_size_mb={self.file_size_mb} >= 1, "
                f"max_processes={self.max_processes} >= 0")

    @property
    def cpu_s(self) -> int:
        """RLIMIT_CPU (whole seconds): the wall-clock limit rounded up; CPU time cannot outrun wall
        time for one thread, so this only matters for a multi-threaded spinner."""
        return max(1, math.ceil(self.timeout_s))


@dataclass(frozen=True)
class SandboxResult:
    reason: str
    """One of REASONS."""
    detail: str
    """The exception's last lines, the signal, or the end of stderr; empty when passed."""
    seconds: float
    """Wall-clock time of the child."""
    network: str
    """Network isolation that applied: netns, userns+netns (plus the audit hook), audit-hook, unknown."""

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
        timed_out = False
        with contextlib.suppress(BrokenPipeError):  # a child that died at start-up
            proc.stdin.write(f"{nonce}\n".encode())
            proc.stdin.close()
        try:
            proc.wait(timeout=config.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(proc.pid)
            proc.wait()
        seconds = time.monotonic() - start
        report = _read_result(r, nonce)
        stderr = (work / "stderr").read_bytes()[-600:].decode("utf-8", "replace")
    return _classify(proc.returncode, timed_out, report, stderr, seconds, config)


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


def _classify(returncode: int, timed_out: bool, report: dict | None, stderr: str, seconds: float,
              config: SandboxConfig) -> SandboxResult:
    network = report["network"] if report else "unknown"
    network = "audit-hook" if network == "none" else network
    if timed_out:
        return SandboxResult("timeout", f"killed after the {config.timeout_s:g} s wall-clock limit",
                             seconds, network)
    if returncode < 0:
        sig = signal.Signals(-returncode)
        if sig in (signal.SIGXCPU, signal.SIGKILL) and seconds >= config.cpu_s * 0.9:
            return SandboxResult("timeout", f"{sig.name} at the {config.cpu_s} s CPU limit", seconds, network)
        return SandboxResult("crashed", f"killed by {sig.name}; stderr: {stderr[-300:]}", seconds, network)
    if report is None:
        return SandboxResult("no_result", f"exited with code {returncode} before the tests finished; "
                             f"stderr: {stderr[-300:]}", seconds, network)
    return SandboxResult(report["reason"], report["detail"], seconds, network)


@cache
def network_isolation() -> str:
    """Which network isolation the sandbox gets on this machine (runs one trivial check)."""
    return run_python("", "", SandboxConfig(timeout_s=10)).network
