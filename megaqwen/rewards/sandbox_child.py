"""The sandbox's child process (see sandbox.py): isolate, limit, run solution.py then tests.py.

    python -I sandbox_child.py RESULT_FD CPU_S MEMORY_MB FILE_SIZE_MB MAX_PROCESSES

Run with the working directory holding solution.py and tests.py. The first line of stdin is a nonce,
read before any candidate code runs; the result is written to RESULT_FD as `NONCE{json}` only once the
tests have finished, so a program that exits early (`sys.exit(0)`, `os._exit(0)`) cannot pass.
Standard library only: this file runs outside the package, with `-I` (no site dirs, no env vars).
"""

import ctypes
import json
import os
import resource
import signal
import socket
import sys
import traceback

CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MAX_DETAIL = 1000  # characters of the exception kept: the result must fit the pipe buffer (64 KiB)


def isolate_network() -> str:
    """A fresh network namespace (only a downed loopback) for this process and its children: as root,
    or through a user namespace where unprivileged ones are allowed. Which one applied, or "none"."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return "none"
    for flags, name in ((CLONE_NEWNET, "netns"), (CLONE_NEWUSER | CLONE_NEWNET, "userns+netns")):
        if libc.unshare(flags) == 0:
            return name
    return "none"


def enter_pid_namespace() -> bool:
    """Run the candidate as PID 1 of a new PID namespace: when it ends (or the parent kills this
    process group), the kernel kills every process left in the namespace, setsid() escapers too.
    This process stays outside, waits, and ends the way the candidate did. False where not allowed."""
    try:
        if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWPID) != 0:
            return False
    except OSError:
        return False
    pid = os.fork()  # the first child is the namespace's init
    if pid == 0:
        return True
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):  # those two cannot be given a handler
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    os._exit(os.waitstatus_to_exitcode(status))


def block_sockets() -> None:
    """An audit hook (it cannot be removed from Python) refusing name lookups and any connect/bind/send
    on a non-Unix socket: the fallback where no namespace could be made, and a second wall where one was.
    Code using ctypes or a subprocess gets past it; the namespace does not have that hole."""
    lookups = {"socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo"}
    sends = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"}

    def hook(event: str, args: tuple) -> None:
        if event in lookups or (event in sends and getattr(args[0], "family", None) != socket.AF_UNIX):
            raise PermissionError(f"sandbox: no network ({event})")

    sys.addaudithook(hook)


def set_limits(cpu_s: int, memory_mb: int, file_size_mb: int, max_processes: int) -> None:
    mb = 1 << 20
    # soft CPU limit -> SIGXCPU, hard limit one second later -> SIGKILL
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb * mb, memory_mb * mb))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_mb * mb, file_size_mb * mb))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if max_processes > 0:  # counts every process of the user, not only this sandbox's
        resource.setrlimit(resource.RLIMIT_NPROC, (max_processes, max_processes))


def run_candidate() -> tuple[str, str]:
    """(reason, detail): passed, wrong_answer (AssertionError), memory (MemoryError) or exception."""
    scope = {"__name__": "solution"}
    try:
        with open("solution.py", encoding="utf-8") as f:
            program = f.read()
        with open("tests.py", encoding="utf-8") as f:
            tests = f.read()
        exec(compile(program, "solution.py", "exec"), scope)
        exec(compile(tests, "tests.py", "exec"), scope)
        return "passed", ""
    except MemoryError:
        scope.clear()  # free what the bomb holds before building the result
        return "memory", "MemoryError"
    except AssertionError as e:
        return "wrong_answer", _last_lines(e)
    except SystemExit as e:
        return "exception", f"SystemExit({e.code!r}) before the tests finished"
    except BaseException as e:  # noqa: BLE001 -- anything the candidate raises is its failure
        return "exception", _last_lines(e)


def _last_lines(e: BaseException) -> str:
    return "".join(traceback.format_exception(e)[-3:])[-MAX_DETAIL:]


def main() -> None:
    fd, cpu_s, memory_mb, file_size_mb, max_processes = map(int, sys.argv[1:6])
    nonce = sys.stdin.readline().strip()
    sys.stdin = open(os.devnull)  # noqa: SIM115
    sys.argv = ["solution.py"]
    network = isolate_network()
    # after the user namespace (if any), which grants the right to make a PID namespace
    applied = [n for n in (network, "pidns" if enter_pid_namespace() else "none") if n != "none"]
    block_sockets()
    isolation = "+".join([*applied, "audit-hook"])
    set_limits(cpu_s, memory_mb, file_size_mb, max_processes)
    reason, detail = run_candidate()
    os.write(fd, (nonce + json.dumps({"reason": reason, "detail": detail, "isolation": isolation})).encode())


if __name__ == "__main__":
    main()
