"""A resume that cannot lie: the resume contract, allowed changes, the run-folder lock, metrics rows."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megaqwen.train import checkpoint as ckpt
from megaqwen.train.errors import UsageError
from megaqwen.train.loop import train
from megaqwen.train.metrics import MetricsLogger
from megaqwen.train.run_lock import LOCK_NAME, RunLock


def rows(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def test_mismatched_resume_is_refused_with_a_table_of_differences(tmp_path, shard, make_config):
    train(make_config(tmp_path, shard, "train.steps=3"))
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(UsageError) as e:
        train(make_config(tmp_path, shard, "train.steps=6", "train.seq_len=16", "train.seed=7"))
    msg = str(e.value)
    assert "step_00000003" in msg
    table = {line.split()[0]: line.split()[1:] for line in msg.splitlines()[2:4]}
    assert table == {"train.seq_len": ["32", "16"], "train.seed": ["1234", "7"]}
    assert "train.allow_changes=[train.seq_len,train.seed]" in msg
    assert (tmp_path / "metrics.jsonl").read_text() == before  # nothing trained, nothing rewritten
    assert not (tmp_path / LOCK_NAME).exists()


def test_allowed_change_resumes_on_a_new_sample_stream(tmp_path, shard, make_config):
    train(make_config(tmp_path, shard, "train.steps=3"))
    summary = train(make_config(tmp_path, shard, "train.steps=5", "train.seq_len=64",
                                "train.allow_changes=[train.seq_len]"))
    assert summary["start_step"] == 3 and summary["last_step"] == 5
    r = rows(tmp_path)
    assert [x["step"] for x in r] == [1, 2, 3, 4, 5]
    assert [x["consumed_samples"] for x in r[3:]] == [4, 8]  # the 64-token stream starts at sample 0
    meta = ckpt.read_meta(ckpt.latest_checkpoint(tmp_path / "checkpoints"))
    assert meta["resume"]["train.seq_len"] == 64  # the next resume compares against the new settings


def test_section_in_allow_changes_and_unknown_entries(tmp_path, shard, make_config):
    train(make_config(tmp_path, shard, "train.steps=2"))
    link = tmp_path / "link"  # the same shard under another path
    for ext in (".bin", ".idx"):
        os.symlink(shard + ext, str(link) + ext)
    with pytest.raises(UsageError, match=r"'data.pth' is not a resume-contract key \(did you mean data.path"):
        train(make_config(tmp_path, str(link), "train.steps=3", "train.allow_changes=[data.pth]"))
    summary = train(make_config(tmp_path, str(link), "train.steps=3", "train.allow_changes=[data]"))
    assert summary["start_step"] == 2


def test_new_data_stage_needs_only_data_path_allowed(tmp_path, shard, make_config):
    """A stage switch to other shards: data.path allowed implies their new fingerprint."""
    import numpy as np

    from megaqwen.data.indexed import IndexedDatasetBuilder

    train(make_config(tmp_path / "run", shard, "train.steps=2"))
    stage2 = tmp_path / "stage2"
    with IndexedDatasetBuilder(stage2) as b:
        for i in range(60):
            b.add_document(np.arange(4, 80 + i, dtype=np.int64) % 512)
    with pytest.raises(UsageError, match="data.path") as e:
        train(make_config(tmp_path / "run", str(stage2), "train.steps=4"))
    assert "data.shards" in str(e.value)  # other files too, not only another name
    summary = train(make_config(tmp_path / "run", str(stage2), "train.steps=4",
                                "train.allow_changes=[data.path]"))
    assert summary["start_step"] == 2 and summary["last_step"] == 4


def test_resume_false_on_a_folder_with_checkpoints_is_refused(tmp_path, shard, make_config):
    train(make_config(tmp_path, shard, "train.steps=2"))
    with pytest.raises(UsageError, match="train.resume=false would start a second run"):
        train(make_config(tmp_path, shard, "train.steps=2", "train.resume=false"))


def test_finished_run_trains_nothing_and_keeps_its_records(tmp_path, shard, make_config):
    train(make_config(tmp_path, shard, "train.steps=3"))
    before = (tmp_path / "metrics.jsonl").read_text()
    summary = train(make_config(tmp_path, shard, "train.steps=3"))
    assert summary["start_step"] == 3 and summary["final"] == {}
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_metrics_have_no_duplicate_steps_after_kill_and_resume(tmp_path, shard, make_config, monkeypatch):
    straight = tmp_path / "straight"
    train(make_config(straight, shard, "train.steps=6", "train.save_every=3"))

    class Killed(Exception):
        pass

    original = MetricsLogger.log

    def log_then_die_at_5(self, step, metrics):
        original(self, step, metrics)
        if step == 5:
            raise Killed  # steps 4 and 5 are in metrics.jsonl; the last checkpoint is step 3

    monkeypatch.setattr(MetricsLogger, "log", log_then_die_at_5)
    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        train(make_config(out, shard, "train.steps=6", "train.save_every=3"))
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4, 5]
    monkeypatch.undo()
    summary = train(make_config(out, shard, "train.steps=6", "train.save_every=3"))
    assert summary["start_step"] == 3
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows(out)] == [r["loss"] for r in rows(straight)]


@pytest.fixture
def other_process():
    """A live process that is not us (the lock's holder in the tests)."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield p
    p.kill()
    p.wait()


def hold(out_dir: Path, pid: int, host: str | None = None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    holder = {"pid": pid, "host": host or socket.gethostname(), "started": "2026-01-01 00:00:00",
              "argv": ["megaqwen-train", "train.steps=100"]}
    (out_dir / LOCK_NAME).write_text(json.dumps(holder))


def test_second_job_on_a_locked_folder_stops_naming_the_holder(tmp_path, shard, make_config, other_process):
    hold(tmp_path, other_process.pid)
    with pytest.raises(UsageError) as e:
        train(make_config(tmp_path, shard, "train.steps=2"))
    msg = str(e.value)
    assert f"pid {other_process.pid} on host {socket.gethostname()}" in msg
    assert "megaqwen-train train.steps=100" in msg and str(tmp_path / LOCK_NAME) in msg
    assert not (tmp_path / "metrics.jsonl").exists()
    other_process.kill()
    other_process.wait()
    summary = train(make_config(tmp_path, shard, "train.steps=2"))  # the holder is gone: stale lock
    assert summary["last_step"] == 2
    assert not (tmp_path / LOCK_NAME).exists()  # released at the end


def test_lock_of_another_host_expires_without_refresh(tmp_path):
    hold(tmp_path, 1, host="node-elsewhere")
    lock = RunLock(tmp_path, timeout_min=1)
    with pytest.raises(UsageError, match="pid 1 on host node-elsewhere"):
        lock.acquire()
    old = os.path.getmtime(tmp_path / LOCK_NAME) - 120
    os.utime(tmp_path / LOCK_NAME, (old, old))
    lock.acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
