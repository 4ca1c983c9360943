"""Mistakes in what the user asked for, reported as one message: no traceback, once per job.

A configuration or input error (a misspelt key, a missing shard, a resume that does not match its
checkpoint) is not a bug in megaqwen, so a traceback only hides the one line that matters. The
command lines print `PROG: error: MESSAGE` on rank 0 (the other ranks of a torchrun job stay quiet)
and exit with status 2; `MEGAQWEN_DEBUG=1` (or `megaqwen-train --debug`) re-raises instead.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Iterable

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


def did_you_mean(word: str, candidates: Iterable[str], n: int = 3) -> str:
    """` (did you mean X?)` for the closest candidates, or '' when none is close."""
    candidates = list(candidates)
    close = [c for c in candidates if _words(c) == _words(word)]  # train.lr_min -> train.min_lr
    close = close or _best(word, candidates, n, cutoff=0.6)
    if not close:  # a wrong section with the right field: `steps` or `model.steps` -> train.steps
        tail = word.rsplit(".", 1)[-1]
        by_tail = {c.rsplit(".", 1)[-1]: c for c in candidates}
        close = [by_tail[t] for t in _best(tail, list(by_tail), n, cutoff=0.75)]
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _words(key: str) -> tuple[str, list[str]]:
    section, _, name = key.rpartition(".")
    return section, sorted(name.split("_"))


def _best(word: str, candidates: list[str], n: int, cutoff: float) -> list[str]:
    """The candidates most similar to `word`: the best one and any as good (at most n)."""
    scored = sorted(((difflib.SequenceMatcher(None, word, c).ratio(), c) for c in candidates), reverse=True)
    scored = [(r, c) for r, c in scored if r >= cutoff]
    return [c for r, c in scored[:n] if r >= scored[0][0] - 0.02] if scored else []


def report(prog: str, err: BaseException) -> int:
    """Print `err` as one error message on rank 0; return the exit status for sys.exit."""
    if is_rank0():
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
    return EXIT_USAGE
