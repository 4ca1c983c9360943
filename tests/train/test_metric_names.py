"""Every key the trainer logs is documented in megaqwen.train.metric_names, and the documented
always-present keys are logged; docs/metrics.md is the registry's current rendering."""

import json
from pathlib import Path

from megaqwen.train import metric_names as mn
from megaqwen.train.loop import train

ROOT = Path(__file__).resolve().parents[2]


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _present(metric: mn.Metric, row: dict) -> bool:
    return any(metric.matches(k) for k in row)


def test_every_logged_metric_is_documented(tmp_path, shard, make_config):
    dense, moe = tmp_path / "dense", tmp_path / "moe"
    recipe = tmp_path / "blend.json"  # the shard twice: sources random_0 (1/4) and random_1 (3/4)
    recipe.write_text(json.dumps({"name": "two", "datasets": [{"prefix": shard, "weight": 1},
                                                              {"prefix": shard, "weight": 3}]}))
    # a blend, eval every 2 steps, checkpoints, a known peak (MFU), a dropped step (NaN at step 3)
    train(make_config(dense, str(recipe), "train.steps=4", "train.save_every=2", "train.eval_every=2",
                      "train.eval_iters=1", f"data.valid_path={shard}", "train.peak_flops=1e12",
                      "train.on_nonfinite=skip", "train.inject_nan_at_step=3"))
    train(make_config(moe, shard, "model=debug-moe", "train.steps=2", "train.save_every=0",
                      "model.router_z_loss_coef=0.001"))
    rows = {"dense": _rows(dense), "moe": _rows(moe)}
    keys = {k for rs in rows.values() for r in rs for k in r}
    assert mn.unregistered(keys) == [], "logged but not in megaqwen/train/metric_names.py"
    for name, rs in rows.items():
        for r in rs:
            missing = [m.name for m in mn.by_when("always", "world<=16") if not _present(m, r)]
            assert not missing, f"{name} step {r['step']}: documented as always logged, absent: {missing}"
    for r in rows["dense"]:
        assert _present(mn.lookup("mfu"), r)
        assert all(_present(m, r) for m in mn.by_when("eval")) == (r["step"] % 2 == 0)
        # saves at steps 2 and 4 (the last): reported on the row after, so on step 3's only
        assert all(_present(m, r) for m in mn.by_when("checkpoint")) == (r["step"] == 3)
    assert [r["skipped_steps"] for r in rows["dense"]] == [0, 0, 1, 1]
    assert all(r["mix/random_0"] == 0.25 and r["mix/random_1"] == 0.75 for r in rows["dense"])
    for r in rows["moe"]:
        missing = [m.name for m in mn.by_when("moe", "moe-small") if not _present(m, r)]
        assert not missing, f"moe step {r['step']}: documented for MoE, absent: {missing}"


def test_registry_entries_and_generated_doc():
    assert len({m.name for m in mn.METRICS}) == len(mn.METRICS)
    assert mn.lookup("moe/L3/e12").name == "moe/L{i}/e{e}"
    assert mn.lookup("peak_mem_gib/rank7").name == "peak_mem_gib/rank{r}"
    assert mn.lookup("mix/web").name == "mix/{name}"
    assert mn.lookup("moe/L3/e12/x") is None and mn.lookup("loss2") is None
    assert mn.unregistered(["step", "loss", "pp_rank3_peak_mem_gib", "nope"]) == ["nope"]
    doc = ROOT / "docs" / "metrics.md"
    assert doc.read_text() == mn.markdown_table(), (
        "docs/metrics.md is stale: python -m megaqwen.train.metric_names > docs/metrics.md")


def test_wandb_offline_resume_continues_the_same_run(tmp_path, shard, make_config, monkeypatch):
    """A restart logs into the same W&B run id (one offline-run-* folder per process), the run
    records the config and git revision, and the documented `wandb sync` command accepts the folders."""
    import subprocess
    import sys

    from megaqwen.train.metrics import git_revision

    monkeypatch.setenv("WANDB_MODE", "offline")
    wb = ("logger.wandb.enabled=true", "logger.wandb.mode=offline", "train.save_every=0")
    train(make_config(tmp_path, shard, "train.steps=3", "train.exit_at_step=2", *wb))
    train(make_config(tmp_path, shard, "train.steps=3", *wb))
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith("-" + run_id) for r in runs)
    first = (runs[0] / f"run-{run_id}.wandb").read_bytes()  # records are small: no block split
    assert b"global_batch_size" in first
    if git_revision():  # W&B records the commit of the checkout it runs in
        assert git_revision().encode() in first
    exe = Path(sys.executable).with_name("wandb")
    out = subprocess.run([str(exe), "sync", "--dry-run", *map(str, runs)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "Would sync 2 run(s)" in out.stdout + out.stderr, out.stderr[-2000:]
