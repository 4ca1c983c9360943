"""Say which collective failed, where, and which ranks were elsewhere, instead of hanging.

Every collective times out after `parallel.collective_timeout_s` (the process group's timeout), but
what torch then raises says little: gloo "Timed out waiting 600000ms for recv operation", NCCL's
watchdog an op type and a sequence number. Neither names the training phase or the peer that never
came. `CollectiveWatch` adds both:

- the loop marks its phases (`with phase("gradient norm", step)`), in memory;
- a daemon thread publishes this rank's step, phase and a heartbeat time in the job's c10d store
  (`megaqwen/watch/<rank>`) every `timeout / 10` seconds (0.5 to 30 s): one small write per rank per
  interval, whatever the step rate;
- when a step fails with a collective error (timeout, or a peer that closed its connection),
  `explain` turns it into a `CollectiveError` naming this rank and its mesh coordinates, the
  operation (the innermost `torch.distributed` call in the traceback, its process group's ranks and
  the megaqwen line that issued it), the phase and step, the timeout, and the other ranks that
  were not with it: those whose heartbeat stopped (a stopped or dead process: its threads stopped
  too) and those in another step or phase. Heartbeat ages compare clocks across hosts, so they
  assume synchronised clocks (NTP), as any cluster has.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist

log = logging.getLogger(__name__)

KEY = "megaqwen/watch/{rank}"
# what gloo, NCCL and the c10d store say when a peer never answers or went away
_TIMEOUT = re.compile(r"timed out|timeout|time out", re.IGNORECASE)
_PEER_LOST = re.compile(r"connection (reset|closed|refused)|pair closure|broken pipe|peer|"
                        r"connectfullmesh|socket", re.IGNORECASE)
_LISTED = 8  # ranks spelled out in the message; the rest are counted
_STALE = 2.5  # heartbeat intervals without a beat: the rank is stopped or dead

_PACKAGE = str(Path(__file__).resolve().parents[1]).replace("\\", "/") + "/"  # .../megaqwen/
_active: CollectiveWatch | None = None


class CollectiveError(RuntimeError):
    """A collective did not complete: timed out, or a peer rank's connection was lost."""


def begin_step(step: int) -> None:
    """The step the following phases belong to."""
    if _active is not None:
        _active.current, _active.entered = (step, "step start"), time.time()


@contextlib.contextmanager
def phase(name: str, step: int | None = None) -> Iterator[None]:
    """Mark the loop's phase on the active watch (no-op without one, e.g. a single process). An
    exception leaves the phase set, for `CollectiveWatch.explain` to report."""
    watch = _active
    if watch is None:
        yield
        return
    prev = watch.current, watch.entered
    watch.current, watch.entered = (step if step is not None else prev[0][0], name), time.time()
    yield
    watch.current, watch.entered = prev


class CollectiveWatch:
    """This rank's phase, its heartbeat in the store, and the translation of collective failures
    (see the module doc)."""

    def __init__(self, rank: int, world_size: int, timeout_s: float, coords: dict[str, int] | None = None,
                 store: Any = None):
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.coords = coords or {}
        self.store = store
        self.current: tuple[int, str] = (0, "start-up")
        self.entered = time.time()
        self.interval = min(30.0, max(0.5, timeout_s / 10))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def install(cls, rank: int, world_size: int, timeout_s: float,
                coords: dict[str, int] | None = None) -> CollectiveWatch:
        """The process's watch; with a distributed world, its heartbeat thread is started."""
        global _active
        store = None
        if dist.is_available() and dist.is_initialized() and world_size > 1:
            try:
                store = dist.distributed_c10d._get_default_store()
            except (RuntimeError, AttributeError, ValueError):  # no store (e.g. a fake group)
                store = None
        _active = cls(rank, world_size, timeout_s, coords, store)
        if store is not None:
            _active._thread = threading.Thread(target=_active._beat, name="megaqwen-heartbeat", daemon=True)
            _active._thread.start()
        return _active

    def uninstall(self) -> None:
        global _active
        self._stop.set()
        if _active is self:
            _active = None

    def _record(self) -> str:
        (step, name), now = self.current, time.time()
        return json.dumps({"step": step, "phase": name, "entered": self.entered, "beat": now})

    def _beat(self) -> None:
        while not self._stop.is_set():
            try:
                self.store.set(KEY.format(rank=self.rank), self._record())
            except Exception:  # noqa: BLE001  (the store going away must not fail training)
                return
            self._stop.wait(self.interval)

    # -- after a failure ------------------------------------------------------------------------

    def explain(self, exc: BaseException) -> CollectiveError | None:
        """A CollectiveError for a collective failure, None for any other exception."""
        text = f"{type(exc).__name__}: {exc}"
        op = operation(exc)
        timed_out = bool(_TIMEOUT.search(text))
        if not (timed_out or (op is not None and _PEER_LOST.search(text))
                or type(exc).__name__ in ("DistBackendError", "DistNetworkError")):
            return None
        step, name = self.current
        where = ", ".join(f"{k} {v}" for k, v in self.coords.items())
        what = op or _phase_ops(name)
        how = (f"did not complete within parallel.collective_timeout_s={self.timeout_s:g} s" if timed_out
               else "failed: a peer rank's connection was lost")
        lines = [f"rank {self.rank}{f' ({where})' if where else ''}: {what} {how}, "
                 f"at step {step} during '{name}' (entered {time.time() - self.entered:.1f} s before the "
                 "error)."]
        others = self.elsewhere()
        if others:
            lines.append("Other ranks: " + others)
        lines.append("One rank that stopped, died or runs far behind blocks every rank that waits for it; "
                     "its own log tells why. Underlying error: " + text)
        return CollectiveError("\n".join(lines))

    def elsewhere(self) -> str:
        """The ranks whose heartbeat stopped or whose (step, phase) differs, from the store."""
        if self.store is None:
            return ""
        self._stop.set()
        try:
            self.store.set_timeout(timedelta(seconds=5))
            keys = [KEY.format(rank=r) for r in range(self.world_size)]
            records = {k: json.loads(self.store.get(k)) for k in keys if self.store.check([k])}
        except Exception as e:  # noqa: BLE001  (the store host may be gone too)
            return f"(could not read the other ranks' heartbeats: {e})"
        step, name = self.current
        now, silent, busy = time.time(), [], []
        for r, k in enumerate(keys):
            rec = records.get(k)
            if r == self.rank:
                continue
            if rec is None:
                silent.append(f"rank {r} (never reported)")
            elif now - rec["beat"] > _STALE * self.interval:
                silent.append(f"rank {r} (no heartbeat for {now - rec['beat']:.1f} s; at its last one it "
                              f"was at step {rec['step']} in '{rec['phase']}')")
            elif (rec["step"], rec["phase"]) != (step, name):
                busy.append(f"rank {r} at step {rec['step']} in '{rec['phase']}'")
        parts = []
        for label, ranks in (("not responding (stopped or dead)", silent), ("elsewhere", busy)):
            if ranks:
                more = f", and {len(ranks) - _LISTED} more" if len(ranks) > _LISTED else ""
                parts.append(f"{label}: " + "; ".join(ranks[:_LISTED]) + more)
        return ". ".join(parts) if parts else "every rank's heartbeat is live and in the same phase"


def operation(exc: BaseException) -> str | None:
    """'all_reduce over ranks [0, 1] (issued at megaqwen/train/loop.py:338 in agreed)' from the
    traceback: the innermost public torch.distributed function and the megaqwen frame that led to it."""
    tb, c10d, other, caller = exc.__traceback__, None, None, None
    while tb is not None:
        frame, fn = tb.tb_frame, tb.tb_frame.f_code.co_filename.replace("\\", "/")
        name = frame.f_code.co_name
        if "/torch/distributed/" in fn and not name.startswith("_") and name != "wrapper":
            if fn.endswith("distributed_c10d.py"):
                c10d = (name, frame.f_locals.get("group"), fn)
            else:
                other = (name, None, fn)
        elif fn.startswith(_PACKAGE) and not fn.endswith("/watchdog.py"):
            caller = f"megaqwen/{fn[len(_PACKAGE):]}:{tb.tb_lineno} in {name}"
        tb = tb.tb_next
    op = c10d or other
    if op is None:
        return None
    name, group, fn = op
    if op is other:
        name = f"{fn.rsplit('/torch/', 1)[1][:-3].replace('/', '.')}.{name}"
    ranks = ""
    if fn.endswith("distributed_c10d.py"):
        try:
            g = group if group is not None else dist.group.WORLD
            ranks = f" over ranks {dist.get_process_group_ranks(g)}"
        except Exception:  # noqa: BLE001  (a destroyed or foreign group)
            ranks = ""
    return f"{name}{ranks}" + (f" (issued at {caller})" if caller else "")


def _phase_ops(name: str) -> str:
    """What collectives a phase runs, for errors raised inside autograd or C++ (no Python frame)."""
    known = {
        "forward/backward": "a collective inside forward/backward (tensor, sequence, context or expert "
                            "parallel exchange, or the DDP/FSDP gradient reduction)",
        "pipeline schedule": "a pipeline send/recv or collective inside the schedule",
        "optimizer step": "a collective of the optimizer step (ZeRO-1 parameter broadcast)",
    }
    return known.get(name, f"a collective of '{name}'")
