"""`megaqwen-train --check` refuses, once and as one line, everything a rank would refuse before its
first step: exit status 2, `megaqwen-train: error: ...` with a "did you mean" for a misspelt choice,
no traceback. Each class below is reached through the real command line; those a single process
can hit are also refused by the trainer itself with the same message (one check, two callers)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess

import pytest
import torch

from megaqwen.train.loop import train
from megaqwen.train.preflight import compose_config

from .test_cli import BIN, ROOT, run_cli

PP4 = ["model.num_layers=4", "train.global_batch_size=16", "train.micro_batch_size=1"]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="refused only on a machine without CUDA")

# (world size, overrides, what the one line says)
REFUSALS = {
    "cp_mode typo": (1, ["parallel.cp_mode=rng"], "parallel.cp_mode='rng' is not one of ring | alltoall "
                                                  "(did you mean ring?)"),
    "recompute typo": (1, ["parallel.recompute=selctive"], "(did you mean selective?)"),
    "backend typo": (1, ["parallel.backend=ncl"], "(did you mean nccl?)"),
    "pp_schedule typo at pp=1": (1, ["parallel.pp_schedule=1fb1"], "(did you mean 1f1b?)"),
    "dp_mode typo": (1, ["parallel.dp_mode=zero"], "(did you mean zero1?)"),
    "engine typo": (1, ["train.engine=deepspeedd"], "(did you mean deepspeed?)"),
    "on_nonfinite typo": (1, ["train.on_nonfinite=skp"], "(did you mean skip?)"),
    "tp linear backend": (1, ["parallel.tp_linear_backend=tourch"], "must be torch|te, got 'tourch'"),
    "cp_tile": (1, ["parallel.cp_tile=0"], "parallel.cp_tile=0 must be >= 1"),
    "kernel that cannot run here": (1, ["train.device=cpu", "kernels.attention=flash"],
                                    "kernels.attention='flash' cannot run here"),
    "cuda without CUDA": pytest.param(1, ["train.device=cuda"], "torch.cuda.is_available() is False",
                                      marks=NO_CUDA),
    "deepspeed in one process": (1, ["train.engine=deepspeed"], "needs a distributed launch"),
    "init_from missing": (1, ["train.init_from=no/such/run"], "no megaqwen checkpoint at no/such/run"),
    "world size": (2, ["parallel.tp=4"], "world_size=2 is not divisible by tp*pp*cp=4*1*1=4"),
    "model split": (2, ["parallel.tp=2", "model.vocab_size=1001"], "pad it to 1002"),
    "batch split over dp": (2, ["train.global_batch_size=6"], "micro_batch_size (2) x dp (2) = 4"),
    "nccl without CUDA": pytest.param(2, ["parallel.backend=nccl"], "parallel.backend=nccl needs CUDA",
                                      marks=NO_CUDA),
    "ep with deepspeed": (2, ["model=debug-moe", "parallel.ep=2", "train.engine=deepspeed"],
                          "parallel.ep=2 is not supported with train.engine=deepspeed (DeepSpeed builds "
                          "expert-data-parallel groups only for its own MoE layer classes, and ZeRO-3 "
                          "refuses MoE); use train.engine=native with parallel.dp_mode=zero1 or fsdp"),
    "ep on a dense model": (2, ["parallel.ep=2"], "ep=2 needs an MoE model"),
    "cp with deepspeed": (2, ["parallel.cp=2", "train.engine=deepspeed"],
                          "parallel.cp=2 is not supported yet with train.engine=deepspeed"),
    "pp with deepspeed": (2, ["parallel.pp=2", "train.engine=deepspeed"], "DeepSpeed's pipeline engine"),
    "compile with deepspeed": (2, ["parallel.compile=true", "train.engine=deepspeed"],
                               "parallel.compile=true is not supported with train.engine=deepspeed"),
    "zero stage": (2, ["parallel.zero_stage=4", "train.engine=deepspeed"], "must be 1, 2 or 3, got 4"),
    "offload without ZeRO-3": (2, ["parallel.offload_params=true", "train.engine=deepspeed"],
                               "parallel.offload_params needs ZeRO stage 3"),
    "pp micro-batches": (2, ["parallel.pp=2", "train.global_batch_size=2"], "needs at least 2 micro-batches"),
    "pp layers": (2, ["parallel.pp=2", "parallel.pp_schedule=zbv"], "parallel.pp_layers=[0, 1, 1, 0]"),
    "all-to-all heads": (8, ["parallel.cp=8", "parallel.cp_mode=alltoall"],
                         "4 query heads (per tp rank) are not divisible by cp=8"),
    "fsdp of a V-shaped tied embedding": (4, ["parallel.pp=2", "parallel.pp_schedule=zbv",
                                              "parallel.dp_mode=fsdp", *PP4],
                                          "cannot shard the tied embedding"),
}


def check(monkeypatch, capsys, tmp_path, world: int, overrides: list[str]) -> tuple[int, str]:
    """`WORLD_SIZE=world megaqwen-train --check ...` in this process (as launch/torchrun.sh runs
    it); (exit status, stderr)."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    code, out, err = run_cli(monkeypatch, capsys, "--check", f"train.out_dir={tmp_path}",
                             "logger.wandb.enabled=false", *overrides)
    assert out == ""
    return code, err


def assert_one_line(code: int, err: str, says: str) -> None:
    assert code == 2, err
    assert err.startswith("megaqwen-train: error: ") and err.count("\n") == 1, err
    assert says in err and "Traceback" not in err


@pytest.mark.parametrize("world, overrides, says", REFUSALS.values(), ids=REFUSALS.keys())
def test_check_makes_the_refusal_once_in_one_line(monkeypatch, capsys, tmp_path, world, overrides, says):
    code, err = check(monkeypatch, capsys, tmp_path, world, overrides)
    assert_one_line(code, err, says)


@pytest.mark.parametrize("world, overrides", [
    (2, ["parallel.tp=2"]),
    (1, ["parallel.pp_schedule=zbv"]),  # a valid schedule is not refused at pp=1
    (4, ["parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.dp_mode=ddp", *PP4]),
    (2, ["model=debug-moe", "parallel.ep=2", "parallel.dp_mode=fsdp"]),
    (2, ["model=debug-moe", "parallel.ep=2", "parallel.dp_mode=zero1"]),
    (2, ["train.engine=deepspeed", "parallel.zero_stage=3", "parallel.offload_params=true"]),
    (2, ["model=debug-moe", "parallel.cp=2"]),  # MoE x cp (issue 24)
    (2, ["model=debug-moe", "parallel.pp=2"]),  # HF's aux loss under pp (issue 24)
], ids=["tp2", "schedule at pp=1", "zbv with ddp", "ep2 fsdp", "ep2 zero1", "zero3 offload", "moe cp2",
        "moe pp2 aux"])
def test_check_passes_the_neighbours_of_the_refusals(monkeypatch, capsys, tmp_path, world, overrides):
    code, err = check(monkeypatch, capsys, tmp_path, world, overrides)
    assert code is None or code == 0, err
    assert "ready to train" in err


ONE_PROCESS = [k for k, v in REFUSALS.items() if not hasattr(v, "marks") and v[0] == 1]


@pytest.mark.parametrize("name", ONE_PROCESS)
def test_the_trainer_refuses_the_same_with_the_same_words(monkeypatch, capsys, tmp_path, name):
    """Without the pre-flight (train() called directly), the trainer's own start-up refuses before it
    builds the model, with the line --check prints: one check, called from both places."""
    _, overrides, _ = REFUSALS[name]
    code, err = check(monkeypatch, capsys, tmp_path, 1, overrides)
    monkeypatch.delenv("WORLD_SIZE")
    cfg = compose_config([f"train.out_dir={tmp_path}", "logger.wandb.enabled=false", *overrides])
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        train(cfg)
    assert err == f"megaqwen-train: error: {e.value}\n"


@pytest.mark.parametrize("hf_overrides, says", [
    ({}, "no model.safetensors or model.safetensors.index.json"),
    ({"hidden_size": 96}, "model config differs (checkpoint, run): {'hidden_size': (96, 64)"),
], ids=["no weight files", "another model"])
def test_init_from_an_hf_folder_is_checked_before_the_ranks(monkeypatch, capsys, tmp_path, hf_overrides,
                                                            says):
    """An HF folder whose config differs from the run's model, or that holds no weights: refused by
    --check with the words the trainer uses when it reaches the folder."""
    from megaqwen.models.spec import get_spec

    overrides = [f"train.init_from={tmp_path / 'hf'}"]
    cfg = compose_config([f"train.out_dir={tmp_path}", "logger.wandb.enabled=false", *overrides])
    (tmp_path / "hf").mkdir()
    hf = get_spec(cfg.model).hf.config_to_hf(cfg.model, torch.float32) | hf_overrides
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf))
    code, err = check(monkeypatch, capsys, tmp_path, 1, overrides)
    assert_one_line(code, err, says)
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        train(cfg)
    assert err == f"megaqwen-train: error: {e.value}\n"


def test_deepspeed_missing_is_one_line_naming_the_install_command(monkeypatch, capsys, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed"
                        else real(name, *a))
    code, err = check(monkeypatch, capsys, tmp_path, 2, ["train.engine=deepspeed"])
    assert_one_line(code, err, "train.engine=deepspeed needs the deepspeed package, which is not installed: "
                               "pip install -e '.[deepspeed]'")


def test_console_script_check_refuses_a_typo_in_one_line(tmp_path):
    run = subprocess.run([str(BIN / "megaqwen-train"), "--check", f"train.out_dir={tmp_path}",
                          "parallel.recompute=selctive"], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")})
    assert_one_line(run.returncode, run.stderr, "(did you mean selective?)")


def test_launcher_refuses_what_only_two_ranks_refuse_before_starting_them(tmp_path):
    """launch/torchrun.sh --nproc-per-node 2: its `--check` (WORLD_SIZE=2) refuses tp=4 on two ranks,
    a layout a single process never reaches; no rank starts, so no per-rank traceback."""
    cmd = ["bash", str(ROOT / "launch/torchrun.sh"), "--nproc-per-node", "2", f"train.out_dir={tmp_path}",
           "logger.wandb.enabled=false", "parallel.tp=4"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert_one_line(run.returncode, run.stderr, "world_size=2 is not divisible by tp*pp*cp=4*1*1=4")
    assert "process(es)" not in run.stderr and "ChildFailedError" not in run.stdout + run.stderr
    assert not (tmp_path / ".hydra").exists()
