"""A torch.profiler trace of chosen steps, and a CUDA memory snapshot, on request (`profile.*`).

    megaqwen-train profile.start_step=10 profile.num_steps=3 profile.memory_snapshot=true

writes, per rank, under OUT_DIR/profile/steps_10-12/:
    rank0.trace.json        Chrome/Perfetto trace (chrome://tracing, ui.perfetto.dev)
    rank0.ops.txt           the 30 ops with the most self time (CUDA time on GPU, CPU time otherwise)
    rank0.memory.pickle     allocator history with stacks (pytorch.org/memory_viz), CUDA only
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from megaqwen.train.config import ProfileConfig

log = logging.getLogger(__name__)


class StepProfiler:
    """Call before_step(step) and after_step(step) around every optimizer step (1-based steps)."""

    def __init__(self, cfg: ProfileConfig, out_dir: str | Path, rank: int, device: torch.device,
                 start_step: int = 0):
        self.first, self.last = cfg.start_step, cfg.start_step + cfg.num_steps - 1
        self.enabled = cfg.start_step > 0
        self.memory = cfg.memory_snapshot and device.type == "cuda"
        self.rank, self.device = rank, device
        self.dir = Path(out_dir) / "profile" / f"steps_{self.first}-{self.last}"
        self._prof: torch.profiler.profile | None = None
        if self.enabled and self.first <= start_step:
            log.warning("profile.start_step=%d is not after the resumed step %d: nothing will be traced",
                        self.first, start_step)
        if cfg.memory_snapshot and device.type != "cuda":
            log.warning("profile.memory_snapshot=true records the CUDA allocator; on %s there is none",
                        device.type)

    def before_step(self, step: int) -> None:
        if not self.enabled or step != self.first:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        if self.memory:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        self._prof = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True,
                                            with_stack=False)
        self._prof.__enter__()

    def after_step(self, step: int) -> None:
        if self._prof is not None and step >= self.last:
            self.close()

    def close(self) -> None:
        """Stop and write the files (also when the run ends inside the traced range)."""
        if self._prof is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.dir / f"rank{self.rank}.trace.json"))
        sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=30)
        (self.dir / f"rank{self.rank}.ops.txt").write_text(table + "\n")
        if self.memory:
            torch.cuda.memory._dump_snapshot(str(self.dir / f"rank{self.rank}.memory.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        log.info("profiler: steps %d-%d traced into %s", self.first, self.last, self.dir)
