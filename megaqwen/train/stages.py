"""`megaqwen-stages CHAIN [OVERRIDES...]`: a chain of context-extension stages from one command.

CHAIN is a name in `conf/stage/` (qwen2.5, turbo, debug) or a YAML file of the same form:

    name: debug
    overrides: [model=debug, ...]          # Hydra overrides of every stage
    stages:
      - {name: s128, seq_len: 128, rope_theta: 1e4, steps: 4, tokens_per_batch: 512, data: sample}
      - {name: s512, seq_len: 512, rope_theta: 1e6, steps: 2, tokens_per_batch: 1024, lr: 1e-4}

Every stage is one call of the trainer's `train(cfg)` in the same run folder (`train.out_dir`), so
stage k resumes stage k-1's final checkpoint: `train.steps` is the cumulative step budget and
`train.allow_changes` lists exactly the resume-contract keys that differ from the previous stage
(sequence length, RoPE base, context length, batch in samples, data). OVERRIDES on the command line
apply to every stage, after the chain's. A stage's data recipe whose plan (`<recipe>.meta.json`,
written by the data pipeline) gives another `seq_length` or `rope_base` is an error. Before each
stage the trainer's memory estimate (`fit_check.fit_report`, the planner's model) is compared with the
memory one process may use.

A chain may end with `passkey: {lengths: [...], depths: [...], trials: N}`: passkey retrieval on the
final checkpoint, heat map in <out_dir>/passkey/ (`--no-passkey` skips it; `--no-memory-check` both
memory estimates: this one and the start-up fit check). The chain and each stage's outcome (steps,
final checkpoint, loss) are recorded in `<out_dir>/stages.json`; a rerun skips the stages recorded as
done, so the command is resumable.
Each stage's LR schedule (warmup, decay to min_lr) runs over its own steps (`train.schedule_start` =
the stage's first step).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megaqwen.train import resume
from megaqwen.train.config import Config
from megaqwen.train.data_check import check_recipe
from megaqwen.train.plot import STAGES_RECORD as RECORD

log = logging.getLogger("megaqwen.stages")
PROG = "megaqwen-stages"

def _stage_dir() -> Path:
    import megaqwen.conf  # conf/ ships as this package

    return Path(megaqwen.conf.__file__).parent / "stage"


STAGE_DIR = _stage_dir()


@dataclass
class Stage:
    """One context stage: the settings that change from stage to stage."""

    name: str
    """Label in logs and stages.json."""
    seq_len: int
    """Tokens per sample (train.seq_len)."""
    rope_theta: float
    """RoPE base (model.rope_theta): ABF raises it with the length."""
    steps: int
    """Optimizer steps of this stage (train.steps is the running total)."""
    tokens_per_batch: int
    """Global batch in tokens; global_batch_size = tokens_per_batch / seq_len samples."""
    data: str = "sample"
    """data.path: blend recipe (.json, with the long/short mix), shard prefix or `sample`."""
    max_position_embeddings: int = 0
    """model.max_position_embeddings; 0 means seq_len."""
    lr: float | None = None
    """Peak LR of the stage (train.lr); None keeps the chain's."""
    min_lr: float | None = None
    """train.min_lr of the stage; None keeps the chain's."""
    warmup_steps: int | None = None
    """train.warmup_steps of the stage; None keeps the chain's."""
    schedule: str | None = None
    """train.schedule of the stage; None keeps the chain's."""
    overrides: list[str] = field(default_factory=list)
    """Further Hydra overrides of this stage only."""

    def global_batch_size(self) -> int:
        if self.tokens_per_batch % self.seq_len:
            raise ValueError(f"stage {self.name!r}: tokens_per_batch={self.tokens_per_batch} is not a "
                             f"multiple of seq_len={self.seq_len}")
        return self.tokens_per_batch // self.seq_len


@dataclass
class Passkey:
    """Passkey retrieval on the chain's final checkpoint (megaqwen/eval_long.py)."""

    lengths: list[int]
    """Context lengths (tokens)."""
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """Needle depths in [0, 1]."""
    trials: int = 3
    """Keys per cell."""


@dataclass
class Chain:
    name: str
    stages: list[Stage]
    overrides: list[str] = field(default_factory=list)
    source: str = ""
    passkey: Passkey | None = None


def load_chain(name_or_path: str) -> Chain:
    """A chain from `conf/stage/<name>.yaml` or a YAML path; ValueError naming what is wrong."""
    path = Path(name_or_path)
    if not path.is_file():
        path = STAGE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in STAGE_DIR.glob("*.yaml"))
        raise ValueError(f"stage chain {name_or_path!r} not found (no {path}); shipped chains: {known}")
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = set(raw) - {"name", "stages", "overrides", "description", "passkey"}
    if unknown or not raw.get("stages"):
        raise ValueError(f"{path}: needs a non-empty 'stages' list (and optional name, overrides, "
                         f"description); unknown keys {sorted(unknown)}")
    known = {f.name for f in dataclasses.fields(Stage)}
    stages = []
    for i, s in enumerate(raw["stages"]):
        bad = set(s) - known
        if bad:
            raise ValueError(f"{path}: stages[{i}] has unknown keys {sorted(bad)}; known: {sorted(known)}")
        stage = Stage(**{**s, "name": str(s.get("name", i)), "rope_theta": float(s["rope_theta"])})
        if stage.seq_len <= 0 or stage.steps <= 0 or stage.rope_theta <= 0:
            raise ValueError(f"{path}: stage {stage.name!r} needs positive seq_len, steps, rope_theta")
        stage.global_batch_size()
        stages.append(stage)
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: stage names {names} repeat")
    passkey = Passkey(**raw["passkey"]) if raw.get("passkey") else None
    return Chain(str(raw.get("name", path.stem)), stages, list(raw.get("overrides") or []), str(path),
                 passkey)


def stage_overrides(chain: Chain, i: int, extra: list[str]) -> list[str]:
    """Hydra overrides of stage i: the chain's, the stage's settings, the stage's own, then `extra`."""
    s = chain.stages[i]
    out = list(chain.overrides) + [
        f"train.seq_len={s.seq_len}", f"model.rope_theta={s.rope_theta}",
        f"model.max_position_embeddings={s.max_position_embeddings or s.seq_len}",
        f"train.global_batch_size={s.global_batch_size()}",
        f"train.steps={sum(x.steps for x in chain.stages[:i + 1])}",
        f"train.schedule_start={sum(x.steps for x in chain.stages[:i])}", f"data.path={s.data}"]
    for key in ("lr", "min_lr", "warmup_steps", "schedule"):
        if getattr(s, key) is not None:
            out.append(f"train.{key}={getattr(s, key)}")
    return out + list(s.overrides) + list(extra)


def changed_keys(prev: Config, cur: Config, world_size: int) -> list[str]:
    """Resume-contract keys whose values differ between two stages (what allow_changes must list)."""
    a, b = resume.contract(prev, world_size), resume.contract(cur, world_size)
    return [k for k in b if k != "data.shards" and a.get(k) != b[k]]


def _read_record(out_dir: Path) -> dict[str, Any]:
    path = out_dir / RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_record(out_dir: Path, record: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / (RECORD + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(out_dir / RECORD)


def stage_configs(chain: Chain, extra: list[str], world_size: int = 1) -> list[Config]:
    """Every stage's Config (composed and validated, allow_changes filled) before anything runs."""
    from megaqwen.train.preflight import compose_config

    cfgs = []
    for i in range(len(chain.stages)):
        cfg = compose_config(stage_overrides(chain, i, extra))
        if i:
            allowed = changed_keys(cfgs[-1], cfg, world_size)
            cfg.train.allow_changes = sorted(set(cfg.train.allow_changes) | set(allowed))
        cfg.validate()
        check_recipe(cfg.data.path, cfg.train.seq_len, cfg.model.rope_theta)
        cfgs.append(cfg)
    outs = {c.train.out_dir for c in cfgs}
    if len(outs) != 1:
        raise ValueError(f"the stages of a chain share one run folder; got train.out_dir {sorted(outs)}")
    return cfgs


def run_chain(chain: Chain, extra: list[str], memory_check: bool = True,
              passkey: bool = True) -> dict[str, Any]:
    """Run the chain's stages in order (skipping those stages.json records as done), then the chain's
    passkey evaluation when it has one."""
    import torch.distributed as dist

    from megaqwen.parallel.setup import destroy
    from megaqwen.train.checkpoint import latest_checkpoint
    from megaqwen.train.fit_check import fit_report
    from megaqwen.train.loop import train
    from megaqwen.train.preflight import check_config

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfgs = stage_configs(chain, extra, world)
    out_dir = Path(cfgs[0].train.out_dir)
    record = _read_record(out_dir)
    if record and [s["name"] for s in record.get("stages", [])] != [s.name for s in chain.stages]:
        raise ValueError(f"{out_dir / RECORD} records another chain ({record.get('chain')!r}: "
                         f"{[s['name'] for s in record.get('stages', [])]}); use a new train.out_dir")
    if not record:
        record = {"chain": chain.name, "source": chain.source, "overrides": extra,
                  "stages": [{**dataclasses.asdict(s), "status": "pending"} for s in chain.stages]}
    rank0 = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    for i, (stage, cfg) in enumerate(zip(chain.stages, cfgs)):
        entry = record["stages"][i]
        if entry["status"] == "done":
            log.info("stage %s: done before (steps to %d), skipped", stage.name, entry["end_step"])
            continue
        if memory_check:
            report = fit_report(cfg, world)  # the trainer's start-up fit check, before the stage starts
            log.info("stage %s: %s", stage.name, report.summary())
            if not report.fits:
                raise ValueError(f"stage {stage.name!r} does not fit: {report.summary()}: "
                                 f"{'; '.join(report.advice)}; or run with --no-memory-check")
        run = check_config(cfg, world)  # resume contract with this stage's allowed changes
        log.info("stage %s (%d/%d): seq_len %d, rope_theta %g, %d samples/step, steps %d..%d, data %s, "
                 "allowed changes %s", stage.name, i + 1, len(cfgs), cfg.train.seq_len,
                 cfg.model.rope_theta, cfg.train.global_batch_size, run.resume_step, cfg.train.steps,
                 cfg.data.path, cfg.train.allow_changes or "-")
        entry.update(status="running", start_step=run.resume_step,
                     resumed_from=str(run.latest) if run.latest else None,
                     allow_changes=cfg.train.allow_changes, started=time.time())
        if rank0:
            _write_record(out_dir, record)
        try:
            summary = train(cfg)
        finally:
            destroy()
        final = summary.get("final") or {}
        latest = latest_checkpoint(out_dir / "checkpoints")
        entry.update(status="done", end_step=summary["last_step"], finished=time.time(),
                     loss=final.get("loss"), final_checkpoint=str(latest) if latest else None)
        if rank0:
            _write_record(out_dir, record)
    if chain.passkey and passkey and rank0 and "passkey" not in record:
        record["passkey"] = run_passkey(chain.passkey, out_dir, cfgs[-1])
        _write_record(out_dir, record)
    return record


def run_passkey(pk: Passkey, out_dir: Path, cfg: Config) -> dict[str, Any]:
    """Passkey heat map of the run's latest checkpoint into <out_dir>/passkey/."""
    from megaqwen.eval import load_for_eval
    from megaqwen.eval_long import run_passkey as run
    from megaqwen.parallel.setup import resolve_device

    device = resolve_device(cfg.train.device)
    model = load_for_eval(out_dir / "checkpoints", device, attention="plain")
    result = run(model, out_dir / "passkey", pk.lengths, pk.depths, pk.trials, device,
                 title=f"passkey retrieval, {out_dir.name} ({pk.trials} keys per cell)")
    log.info("passkey heat map: %s", result["png"])
    return {"png": result["png"], "cells": result["cells"]}


def main(argv: list[str] | None = None) -> int:
    from megaqwen.cli_common import silence_known_warnings
    from megaqwen.train.errors import UsageError

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        print("shipped chains:", ", ".join(sorted(p.stem for p in STAGE_DIR.glob("*.yaml"))))
        return 0 if args else 2
    memory_check = "--no-memory-check" not in args
    passkey = "--no-passkey" not in args
    args = [a for a in args if a not in ("--no-memory-check", "--no-passkey")]
    silence_known_warnings()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from megaqwen.train.config import register_configs

    register_configs()  # the schema in Hydra's ConfigStore, as megaqwen-train does

    try:
        extra = args[1:]
        if not memory_check and not any(a.startswith("train.fit_check=") for a in extra):
            extra.append("train.fit_check=false")  # --no-memory-check skips the start-up fit check too
        record = run_chain(load_chain(args[0]), extra, memory_check, passkey)
    except (UsageError, ValueError, FileNotFoundError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    for s in record["stages"]:
        print(f"{s['name']}: seq_len {s['seq_len']}, rope_theta {s['rope_theta']:g}, steps "
              f"{s.get('start_step')}..{s.get('end_step')}, loss {s.get('loss')}")
    if record.get("passkey"):
        print(f"passkey heat map: {record['passkey']['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
