"""Checkpoint checksums: every file's size and CRC-32 in meta.json (synchronous and background
saves); a damaged checkpoint (truncated or bit-flipped shard) is named in one line and the resume
falls back to the previous complete checkpoint - with the losses of a run resumed from that
checkpoint directly - or stops (train.on_bad_checkpoint=stop)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from megaqwen.models.config import get_config
from megaqwen.models.qwen2 import build_model
from megaqwen.train import checkpoint as ckpt
from megaqwen.train import integrity
from megaqwen.train.errors import UsageError
from megaqwen.train.loop import train

SHARD = "__0_0.distcp"


def _losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:  # one bit in the middle of the file: same size, bytes that unpickle or load as wrong values
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))


def _assert_records_every_file(folder: Path) -> None:
    files = ckpt.read_meta(folder)["files"]
    assert sorted(files) == integrity.written_files(folder) and SHARD in files and ".metadata" in files
    assert all(files[n] == integrity.file_sum(folder / n) for n in files)


def _run_with_two_checkpoints(root: Path, shard: str, make_config) -> tuple[Path, Path]:
    """`run`: six steps, checkpoints at 3 and 6. `direct`: a copy of it whose step-6 checkpoint is
    gone, resumed from step 3 directly: the curve a fallback must reproduce."""
    run, direct = root / "run", root / "direct"
    train(make_config(run, shard))
    for folder in ("step_00000003", "step_00000006"):
        _assert_records_every_file(run / "checkpoints" / folder)
    shutil.copytree(run, direct)
    shutil.rmtree(direct / "checkpoints" / "step_00000006")
    (direct / "checkpoints" / "latest").write_text("step_00000003")
    assert train(make_config(direct, shard))["start_step"] == 3
    return run, direct


@pytest.mark.parametrize("how", ["truncate", "bitflip"])
def test_damaged_shard_is_named_and_the_resume_falls_back(tmp_path, shard, make_config, caplog, how):
    run, direct = _run_with_two_checkpoints(tmp_path, shard, make_config)
    bad = run / "checkpoints" / "step_00000006"
    damage(bad / SHARD, how)
    with caplog.at_level(logging.WARNING, logger="megaqwen"):
        summary = train(make_config(run, shard))
    assert summary["start_step"] == 3
    lines = [r.getMessage() for r in caplog.records if "fails its checks" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    what = "bytes, meta.json records" if how == "truncate" else "CRC-32"
    assert f"checkpoint {bad} fails its checks: {SHARD} has" in lines[0] and what in lines[0], lines[0]
    assert "resuming from step_00000003 instead" in lines[0]
    assert _losses(run) == _losses(direct)  # exactly the run resumed from step 3 directly
    root = run / "checkpoints"
    assert (root / "step_00000006.damaged" / SHARD).exists()  # set aside for inspection
    assert ckpt.latest_checkpoint(root).name == "step_00000006"  # saved anew by the resumed run
    _assert_records_every_file(root / "step_00000006")


def test_stop_policy_names_the_file_and_touches_nothing(tmp_path, shard, make_config):
    run = tmp_path / "run"
    train(make_config(run, shard))
    bad = run / "checkpoints" / "step_00000006"
    damage(bad / SHARD, "bitflip")
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(UsageError) as e:
        train(make_config(run, shard, "train.steps=7", "train.on_bad_checkpoint=stop"))
    msg = str(e.value)
    assert "\n" not in msg and f"checkpoint {bad} fails its checks: {SHARD} has CRC-32" in msg, msg
    assert "train.on_bad_checkpoint=fallback" in msg
    assert (run / "checkpoints" / "latest").read_text() == "step_00000006" and bad.is_dir()
    assert (run / "metrics.jsonl").read_text() == before


def test_no_checkpoint_left_is_one_error_naming_each(tmp_path, shard, make_config):
    run = tmp_path / "run"
    train(make_config(run, shard))
    damage(run / "checkpoints" / "step_00000006" / SHARD, "truncate")
    (run / "checkpoints" / "step_00000003" / ".metadata").unlink()
    with pytest.raises(UsageError) as e:
        train(make_config(run, shard, "train.steps=7"))
    msg = str(e.value)
    assert "\n" not in msg and "no checkpoint in" in msg, msg
    assert f"step_00000006: {SHARD} has" in msg and "step_00000003: .metadata is missing" in msg, msg
    assert (run / "checkpoints" / "step_00000006").is_dir()  # nothing set aside when nothing resumes


def test_checkpoint_without_checksums_resumes_with_a_note(tmp_path, shard, make_config, caplog):
    run = tmp_path / "run"
    train(make_config(run, shard, "train.steps=3"))
    meta_path = run / "checkpoints" / "step_00000003" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["files"]  # as saved before checksums were recorded
    meta_path.write_text(json.dumps(meta))
    with caplog.at_level(logging.INFO, logger="megaqwen"):
        assert train(make_config(run, shard, "train.steps=4"))["start_step"] == 3
    assert any("records no checksums" in r.getMessage() for r in caplog.records)


def test_background_save_records_checksums(tmp_path):
    torch.manual_seed(0)
    model = build_model(get_config("debug", vocab_size=256, num_layers=2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 256, (2, 16))
    model(tokens, tokens).mean().backward()
    opt.step()
    saver = ckpt.Checkpointer(tmp_path, async_save=True)
    saver.save(1, model, opt, {"consumed_samples": 2})
    assert saver.wait()["checkpoint_step"] == 1
    saver.close()
    folder = ckpt.latest_checkpoint(tmp_path)
    _assert_records_every_file(folder)
    assert ckpt.verify_checkpoint(folder) is None
    damage(folder / SHARD, "bitflip")
    assert ckpt.verify_checkpoint(folder, deep=False) is None  # the size alone cannot tell
    assert ckpt.verify_checkpoint(folder).startswith(f"{SHARD} has CRC-32")


def test_prune_counts_only_this_runs_history(tmp_path):
    for step in range(1, 6):
        ckpt.step_dir(tmp_path, step).mkdir()
    (tmp_path / "step_00000006.damaged").mkdir()
    ckpt._prune(tmp_path, keep_last=2, upto=3)  # step 3 just saved; 4 and 5 are a future never reached
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_00000002", "step_00000003", "step_00000004", "step_00000005", "step_00000006.damaged"]
