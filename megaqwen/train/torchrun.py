"""torchrun as `launch/torchrun.sh` runs it: Ctrl-C goes to the ranks, and a clean stop exits 0.

Stock torchrun turns Ctrl-C (SIGINT) into a `SignalException` in its agent: it forwards the signal to
the ranks (each finishes its step, saves a checkpoint and exits 0, `megaqwen.train.reliability`),
and then ends with a traceback and exit status 1 although every rank stopped cleanly. Here the agent
only forwards SIGINT to its ranks (they run in sessions of their own, so the terminal's Ctrl-C does
not reach them) and goes on waiting for them: it exits 0 when they do. A second Ctrl-C is forwarded
too, stops the ranks at once, and the agent reports their failure as usual. SIGTERM keeps torchrun's
own handling (`--signals-to-handle` without SIGINT, so torchrun does not take SIGINT back).

    python -m megaqwen.train.torchrun --signals-to-handle SIGTERM,SIGHUP,SIGQUIT [torchrun args]
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc; none elsewhere)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        except (OSError, IndexError):
            continue  # exited meanwhile
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _forward_to_ranks(signum: int, frame) -> None:
    for pid in child_pids(os.getpid()):
        with contextlib.suppress(ProcessLookupError):  # exited meanwhile
            os.kill(pid, signum)


def main() -> None:
    from torch.distributed.run import main as torchrun_main

    signal.signal(signal.SIGINT, _forward_to_ranks)
    torchrun_main()


if __name__ == "__main__":
    main()
