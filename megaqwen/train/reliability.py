"""What keeps a long run healthy: pre-emption signals (save and exit cleanly), non-finite steps and
loss spikes (skip, roll back or stop), and the straggler report."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from megaqwen.parallel import setup as par
from megaqwen.parallel.watchdog import phase
from megaqwen.train import checkpoint as ckpt

log = logging.getLogger(__name__)


def straggler_metrics(step_time_s: float, env: par.DistEnv) -> dict[str, float]:
    """Collective: every rank's step time; the slowest rank and the spread (max / min - 1). A rank
    that is persistently slowest points at a bad GPU, NIC or host."""
    dist = torch.distributed
    if not (dist.is_initialized() and env.world_size > 1):
        return {}
    t = torch.tensor([step_time_s], dtype=torch.float64, device=env.device)
    times = [torch.zeros_like(t) for _ in range(env.world_size)]
    dist.all_gather(times, t)
    vals = [float(x) for x in times]
    slow = max(range(len(vals)), key=vals.__getitem__)
    return {"step_time_max_s": vals[slow], "step_time_min_s": min(vals), "slowest_rank": float(slow),
            "step_time_spread": vals[slow] / max(min(vals), 1e-9) - 1.0}


class LossHealth:
    """Counts steps whose update was dropped (non-finite gradients) and flags loss spikes: a loss
    above `spike_factor` times the mean of the previous (up to) 20 finite losses."""

    def __init__(self, spike_factor: float, window: int = 20):
        from collections import deque

        self.spike_factor, self.recent, self.skipped = spike_factor, deque(maxlen=window), 0

    def bad_step(self, step: int, policy: str) -> dict[str, float]:
        self.skipped += 1
        log.warning("step %d: non-finite gradients, update dropped (train.on_nonfinite=%s; %d so far)",
                    step, policy, self.skipped)
        return {"skipped_steps": float(self.skipped)}

    def good_step(self, step: int, loss: float) -> dict[str, float]:
        out = {"skipped_steps": float(self.skipped)}
        if self.spike_factor and len(self.recent) >= 5:
            mean = sum(self.recent) / len(self.recent)
            if loss > self.spike_factor * mean:
                log.warning("step %d: loss spike %.4f (> %.1f x the recent mean %.4f)", step, loss,
                            self.spike_factor, mean)
                out["loss_spike"] = 1.0
        self.recent.append(loss)
        return out


def rollback(ckpt_root: Path, model, optimizer, shards, step: int) -> float:
    """Reload weights and optimizer state from the latest checkpoint (collective); the data stream
    and the step counter go on, so the batches that led to the bad step are not replayed."""
    latest = ckpt.latest_checkpoint(ckpt_root)
    if latest is None:
        raise FloatingPointError(f"non-finite gradients at step {step} and no checkpoint to roll back to "
                                 f"in {ckpt_root} (train.on_nonfinite=rollback needs train.save_every)")
    with phase("rollback: checkpoint load", step):
        meta = ckpt.load_checkpoint(latest, model, optimizer, shards=shards)
    log.warning("step %d: rolled back weights and optimizer state to %s (step %d)", step, latest,
                meta["step"])
    return float(meta["step"])


class StopSignal:
    """SIGTERM and SIGUSR1 (what SLURM sends before pre-emption or a time limit) and SIGINT (Ctrl-C)
    set a flag instead of killing the process; the loop checks it after every step, saves a
    checkpoint and returns, so the job exits 0 and a rerun (or a requeued job) resumes. All ranks
    agree (an all-reduce of the flag), so they stop at the same step even when only some received
    the signal.

    A second Ctrl-C while stopping gives up at once: the handlers are restored and KeyboardInterrupt
    is raised wherever the process is (no checkpoint of this step; `latest` still names the previous
    one). A SIGINT within `REPEAT_S` of the first is the same Ctrl-C again, not a second one: under
    torchrun every rank gets the terminal's SIGINT and then the copy torchrun forwards to it."""

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")
    REPEAT_S = 1.0

    def __init__(self, device: torch.device):
        import signal
        import threading

        self.device, self.received, self._old = device, None, {}
        self._since = 0.0
        if threading.current_thread() is not threading.main_thread():
            return  # handlers can only be installed from the main thread
        for name in self.SIGNALS:
            sig = getattr(signal, name)
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        import signal
        import time

        name = signal.Signals(signum).name
        now = time.monotonic()
        if name == "SIGINT" and self.received is not None:
            if now - self._since < self.REPEAT_S:
                return  # the same Ctrl-C, forwarded by torchrun
            self.close()  # a third Ctrl-C gets Python's default behaviour
            raise KeyboardInterrupt(f"second SIGINT while stopping after {self.received}: stopped at once, "
                                    "without a checkpoint of this step")
        if self.received is None:
            self._since = now
        self.received = name
        log.warning("%s received: finishing this step, saving a checkpoint, then exiting%s", name,
                    " (Ctrl-C again to stop at once, without that checkpoint)" if name == "SIGINT" else "")

    def agreed(self) -> str | None:
        """The signal's name if any rank received one (collective when distributed)."""
        dist = torch.distributed
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([0 if self.received is None else 1 + self.SIGNALS.index(self.received)],
                                device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return self.SIGNALS[int(flag) - 1] if int(flag) else None
        return self.received

    def close(self) -> None:
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)
