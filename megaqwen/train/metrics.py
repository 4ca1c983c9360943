"""Run records: metrics JSONL, W&B, and a console progress line with rate and ETA.

Only the logging rank (rank 0) creates a `MetricsLogger` with `enabled=True`; the others get a
disabled one, so call sites need no rank checks.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def git_revision() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class MetricsLogger:
    def __init__(self, out_dir: str | Path, config: dict[str, Any], wandb_cfg, total_steps: int,
                 enabled: bool = True, log_every: int = 1):
        self.enabled = enabled
        self.total_steps = total_steps
        self.log_every = max(log_every, 1)
        self.wandb_run = None
        self._t0 = time.perf_counter()
        self._first_step: int | None = None
        self._cp = cp_label(config)
        self.last_step: int | None = None
        """The last step logged (on every rank, enabled or not)."""
        if not enabled:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 (closed in close())
        record = {"config": config, "git_revision": git_revision(), "argv": sys.argv,
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (out / "run.json").write_text(json.dumps(record, indent=2))
        if wandb_cfg.enabled and wandb_cfg.mode != "disabled":
            self.wandb_run = _init_wandb(out, config, wandb_cfg)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.last_step = step
        if not self.enabled:
            return
        row = {"step": step, **metrics}
        self.jsonl.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        if self._first_step is None:
            self._first_step, self._t0 = step, time.perf_counter()
        if step % self.log_every == 0 or step == self.total_steps:
            self._progress(step, metrics)

    def _progress(self, step: int, m: dict[str, float]) -> None:
        done = step - (self._first_step or step)
        elapsed = time.perf_counter() - self._t0
        rate = done / elapsed if elapsed > 0 and done > 0 else 0.0
        eta = (self.total_steps - step) / rate if rate > 0 else float("nan")
        log.info("%s", step_line(step, self.total_steps, m, rate, eta, self._cp))

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _init_wandb(out: Path, config: dict[str, Any], cfg):
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or out.name,
                     mode=cfg.mode, dir=str(out), config={**config, "git_revision": git_revision()},
                     resume="allow", id=_wandb_id(out))
    log.info("W&B run %s (%s mode) in %s", run.id, cfg.mode, out / "wandb")
    return run


def _wandb_id(out: Path) -> str:
    """One W&B run id per run folder, so a resumed run continues the same W&B run."""
    path = out / "wandb_id.txt"
    if path.exists():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id)
    return run_id


def cp_label(config: dict[str, Any]) -> str:
    """`cp 4 ring` / `cp 2 alltoall` from a run's config dict; '' without context parallelism."""
    par = config.get("parallel") or {}
    cp = int(par.get("cp", 1) or 1)
    return f"cp {cp} {par.get('cp_mode', 'ring')}" if cp > 1 else ""


_PP_MEM = re.compile(r"pp_rank(\d+)_peak_mem_gib")
_RANK_MEM = re.compile(r"peak_mem_gib/rank(\d+)")
_MOE_LAYER = re.compile(r"moe/L(\d+)/load_max")


def _argmax(m: dict[str, float], pattern: re.Pattern) -> tuple[str, float] | None:
    """(the placeholder, the value) of the largest metric whose key matches `pattern`."""
    hits = [(mt.group(1), v) for k, v in m.items() if (mt := pattern.fullmatch(k))]
    return max(hits, key=lambda kv: kv[1]) if hits else None


def step_line(step: int, total: int, m: dict[str, float], rate: float, eta_s: float, cp: str = "") -> str:
    """The console line of one logged step, from its metrics row. Besides loss, LR, gradient norm,
    throughput and memory it shows what a parallel run needs: the highest peak memory over the ranks
    when it is not rank 0's, under pp the measured (and theoretical) bubble and the largest stage's
    memory, for an MoE model the router losses and the worst layer's most loaded expert, and the cp
    mode (`cp`, from `cp_label`)."""
    parts = [f"step {step}/{total}", f"loss {m['loss']:.4f}", f"lr {m['lr']:.2e}",
             f"gnorm {m['grad_norm']:.3f}", f"{m['tokens_per_s']:.0f} tok/s"]
    if "mfu" in m:
        parts.append(f"mfu {m['mfu']:.1%}")
    mem = f"mem {m['peak_mem_gib']:.2f} GiB"
    top = m.get("peak_mem_gib_max", m["peak_mem_gib"])
    if top > m["peak_mem_gib"] * 1.01 + 1e-3:  # rank 0 is not the largest: name the one that is
        where = _argmax(m, _RANK_MEM)
        mem += f" (max {top:.2f} GiB{f' on rank {where[0]}' if where else ''})"
    parts.append(mem)
    if "pp_bubble_measured" in m:
        pp = f"pp bubble {m['pp_bubble_measured']:.0%}"
        if "pp_bubble_theory" in m:
            pp += f" (theory {m['pp_bubble_theory']:.0%})"
        stage = _argmax(m, _PP_MEM)
        if stage:
            pp += f", largest stage pp{stage[0]} {stage[1]:.2f} GiB"
        parts.append(pp)
    moe = []
    if "aux_loss" in m:
        moe.append(f"aux {m['aux_loss']:.4f}")
    if "z_loss" in m:
        moe.append(f"z {m['z_loss']:.2e}")
    if "moe/load_max" in m:
        layer = _argmax(m, _MOE_LAYER)
        moe.append(f"expert load max {m['moe/load_max']:.2f}x{f' (L{layer[0]})' if layer else ''}")
    if m.get("moe/dropped_frac"):
        moe.append(f"dropped {m['moe/dropped_frac']:.1%}")
    if moe:
        parts.append(", ".join(moe))
    if cp:
        parts.append(cp)
    parts += [f"{rate:.2f} step/s", f"eta {_fmt_eta(eta_s)}"]
    return " | ".join(parts)


def _fmt_eta(seconds: float) -> str:
    if seconds != seconds:  # NaN before the second step
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


def format_summary(summary: dict[str, Any], seconds: float) -> str:
    """The end-of-run lines: what was trained, the last numbers, and what the run folder holds."""
    out, m = Path(summary["out_dir"]), summary["final"]
    start, steps = summary["start_step"], summary["steps"]
    if not m:
        head = f"nothing trained: {out} was already at step {start} of train.steps={steps}"
    else:
        done = summary["last_step"]
        val = f" (validation {m['val_loss']:.4f})" if "val_loss" in m else ""
        head = (f"done: steps {start + 1}-{done} of {steps} in {_fmt_eta(seconds)} | loss {m['loss']:.4f}"
                f"{val} | {m['tokens_per_s']:,.0f} tok/s | peak mem {m['peak_mem_gib']:.2f} GiB")
    return head + "\n" + describe_run_folder(out)


def describe_run_folder(out: Path) -> str:
    """One line naming the files a run leaves, e.g. for the end of the console output."""
    names = ("metrics.jsonl", "run.json", "loss.png", "main.log", ".hydra/")
    items = [n for n in names if (out / n.rstrip("/")).exists()]
    latest = out / "checkpoints" / "latest"
    if latest.exists():
        items.append(f"checkpoints/{latest.read_text().strip()} (latest)")
    items += [f"wandb/{p.name}" for p in sorted((out / "wandb").glob("offline-run-*"))[-1:]]
    items += [f"profile/{p.name}/" for p in sorted((out / "profile").glob("steps_*"))]
    return f"run folder {out}: " + ", ".join(items)
