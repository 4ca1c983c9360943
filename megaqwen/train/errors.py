"""Mistakes in what the user asked for, reported as one message: no traceback, once per job.

A configuration or input error (a misspelt key, a missing shard, a resume that does not match its
checkpoint) is not a bug in megaqwen, so a traceback only hides the one line that matters. The
command lines print `PROG: error: MESSAGE` on rank 0 (the other ranks of a torchrun job stay quiet)
and exit with status 2; `MEGAQWEN_DEBUG=1` (or `megaqwen-train --debug`) re-raises instead.
"""

from __future__ import annotations

import os
import sys

from megaqwen.suggest import did_you_mean  # noqa: F401  (re-exported: train modules use it from here)

DEBUG_ENV = "MEGAQWEN_DEBUG"
EXIT_USAGE = 2


class UsageError(ValueError):
    """The run's configuration or inputs are wrong or unsafe; the message says what to change."""


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0", "false")


def is_rank0() -> bool:
    """Rank 0 of a torchrun job, or a plain process (decided from the environment, before any
    process group exists)."""
    return os.environ.get("RANK", "0") == "0"


def report(prog: str, err: BaseException) -> int:
    """Print `err` as one error message on rank 0; return the exit status for sys.exit."""
    if is_rank0():
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
    return EXIT_USAGE
