"""A stopped rank does not hang the job: the waiting rank fails within parallel.collective_timeout_s
with an error naming itself, the collective, the phase, and the rank that stopped responding."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from megaqwen.parallel.watchdog import CollectiveWatch, operation

from .test_launch import COMMON, ROOT, shard  # noqa: F401  (fixture)

pytestmark = pytest.mark.distributed
TIMEOUT_S = 6


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_stopped_rank_gives_a_named_timeout(tmp_path, shard):  # noqa: F811
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    overrides = [o for o in COMMON if not o.startswith("train.steps")]
    cmd = ["bash", str(ROOT / "launch/torchrun.sh"), "--nproc-per-node", "2", f"train.out_dir={out}",
           f"data.path={shard}", *overrides, "train.steps=100000", "train.save_every=0",
           f"parallel.collective_timeout_s={TIMEOUT_S}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.time() + 300
        while (not metrics.exists() or len(metrics.read_text().splitlines()) < 3) and time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            time.sleep(0.2)
        ranks = {_rank_of(p): p for p in _children(proc.pid)}
        ranks.pop(None, None)
        assert set(ranks) == {0, 1}, ranks
        os.kill(ranks[1], signal.SIGSTOP)  # rank 1 freezes mid-step, as on a hung node
        stopped = time.time()
        while _alive(ranks[0]) and time.time() - stopped < TIMEOUT_S + 60:
            time.sleep(0.2)
        waited = time.time() - stopped
        assert not _alive(ranks[0]), "rank 0 still waits after the timeout"
        # the timeout counts from when rank 0 entered the collective, at most one step before the stop
        assert waited < TIMEOUT_S + 30
    finally:
        for pid in [*_children(proc.pid), proc.pid]:  # torchrun starts each rank in its own session
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        output = proc.communicate(timeout=60)[0]
    assert "rank 0 (pp 0, dp 0, cp 0, tp 0): " in output, output[-4000:]
    assert f"did not complete within parallel.collective_timeout_s={TIMEOUT_S} s" in output
    # the heartbeat thread of a stopped process stops too: rank 1 is named as not responding
    assert "not responding (stopped or dead): rank 1 (no heartbeat for" in output, output[-4000:]
    line = next(x for x in output.splitlines() if "did not complete within" in x)
    # the operation: a named torch.distributed call, or the collectives of the named phase
    ops = ("all_reduce", "all_gather", "broadcast", "barrier", "a collective inside", "a collective of")
    assert any(op in line for op in ops), line
    assert "at step " in line and "during '" in line, line
    assert "Traceback" in output  # the error is raised, the job fails (it does not exit 0 or hang)


def test_explain_names_the_operation_and_ignores_other_errors():
    """A timeout raised from inside a torch.distributed function is named after it; errors that
    are not collective failures pass through unchanged."""
    import torch.distributed.distributed_c10d as c10d

    watch = CollectiveWatch(rank=3, world_size=4, timeout_s=5.0, coords={"dp": 1, "tp": 1})
    watch.current = (7, "gradient norm")

    def fake_all_reduce(tensor, group=None):  # a frame named like c10d's, in a file under torch/distributed
        raise RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv")

    code = compile("def all_reduce(tensor, group=None):\n    return fake(tensor, group)\n",
                   c10d.__file__, "exec")
    ns = {"fake": fake_all_reduce}
    exec(code, ns)
    try:
        ns["all_reduce"](None)
    except RuntimeError as e:
        named = watch.explain(e)
        assert operation(e).startswith("all_reduce")
    assert named is not None
    text = str(named)
    assert text.startswith("rank 3 (dp 1, tp 1): all_reduce")
    assert ("did not complete within parallel.collective_timeout_s=5 s, at step 7 during 'gradient norm'"
            in text)
    assert "Timed out waiting 5000ms" in text  # the original message is kept
    assert watch.explain(ValueError("bad value")) is None
    assert watch.explain(RuntimeError("CUDA out of memory")) is None
