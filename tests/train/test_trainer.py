"""Single-process trainer: learning, resume after a kill, atomic checkpoints, schedules, bad configs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megaqwen.train import checkpoint as ckpt
from megaqwen.train.config import TrainConfig
from megaqwen.train.loop import train
from megaqwen.train.optim import lr_at


def losses(out_dir) -> list[float]:
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows]


def test_loss_falls_and_run_leaves_records(tmp_path, shard, make_config):
    cfg = make_config(tmp_path, shard, "train.steps=25", "train.lr=3e-3", "train.save_every=0",
                      "data.document_mask=true", "data.reset_position_ids=true")
    train(cfg)
    ls = losses(tmp_path)
    assert len(ls) == 25
    assert sum(ls[-5:]) / 5 < sum(ls[:5]) / 5 - 0.2  # learns the unigram distribution at least
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for key in ("lr", "grad_norm", "tokens_per_s", "peak_mem_gib", "step_time_s"):
        assert all(r[key] >= 0 for r in rows), key
    assert rows[-1]["consumed_samples"] == 25 * 4
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["config"]["model"]["vocab_size"] == 512
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints").name == "step_00000025"  # last step saved
    assert (tmp_path / "loss.png").stat().st_size > 10_000


def test_resume_after_kill_gives_identical_losses(tmp_path, shard, make_config):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(make_config(straight, shard, "train.steps=6", "train.save_every=3"))
    cfg = make_config(resumed, shard, "train.steps=6", "train.save_every=3")

    # "Kill" the run right after its step-3 checkpoint lands.
    class Killed(Exception):
        pass

    original = ckpt.save_checkpoint

    def save_then_die(*args, **kwargs):
        path = original(*args, **kwargs)
        raise Killed(path)

    ckpt.save_checkpoint = save_then_die
    try:
        with pytest.raises(Killed):
            train(cfg)
    finally:
        ckpt.save_checkpoint = original
    assert len(losses(resumed)) == 3
    summary = train(make_config(resumed, shard, "train.steps=6", "train.save_every=3"))
    assert summary["start_step"] == 3
    assert losses(resumed) == losses(straight)  # bit-identical, not approximately equal


def test_exit_at_step_then_rerun_equals_straight_run(tmp_path, shard, make_config):
    train(make_config(tmp_path / "a", shard, "train.steps=5", "train.save_every=0"))
    first = train(make_config(tmp_path / "b", shard, "train.steps=5", "train.save_every=0",
                              "train.exit_at_step=2"))
    assert first["final"]["consumed_samples"] == 2 * 4
    assert ckpt.latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step_00000002"
    second = train(make_config(tmp_path / "b", shard, "train.steps=5", "train.save_every=0",
                               "train.exit_at_step=2"))
    assert second["start_step"] == 2
    assert losses(tmp_path / "b") == losses(tmp_path / "a")


def test_crash_during_save_keeps_previous_latest(tmp_path, shard, monkeypatch, make_config):
    cfg = make_config(tmp_path, shard, "train.steps=3", "train.save_every=3")
    train(cfg)
    root = tmp_path / "checkpoints"
    assert ckpt.latest_checkpoint(root).name == "step_00000003"

    def broken_save(state, checkpoint_id):
        Path(checkpoint_id).mkdir(parents=True, exist_ok=True)
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"half a shard")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.dcp, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        train(make_config(tmp_path, shard, "train.steps=6", "train.save_every=3"))
    assert ckpt.latest_checkpoint(root).name == "step_00000003"
    assert (root / "step_00000006.partial").exists() and not (root / "step_00000006").exists()
    monkeypatch.undo()
    (root / "step_00000001.partial").mkdir()  # a crashed save of a step the resumed run never saves
    summary = train(make_config(tmp_path, shard, "train.steps=6", "train.save_every=3"))
    assert summary["start_step"] == 3
    assert ckpt.latest_checkpoint(root).name == "step_00000006"
    assert not list(root.glob("*.partial"))  # every stale partial folder is gone


def test_latest_pointing_at_missing_folder_is_a_clear_error(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / "latest").write_text("step_00000009")
    with pytest.raises(FileNotFoundError, match="step_00000009, which is not a complete checkpoint"):
        ckpt.latest_checkpoint(root)


def test_gradient_accumulation_equals_one_big_batch(tmp_path, shard, make_config):
    a = make_config(tmp_path / "a", shard, "train.micro_batch_size=1", "train.steps=3")
    b = make_config(tmp_path / "b", shard, "train.micro_batch_size=4", "train.steps=3")
    train(a)
    train(b)
    for x, y in zip(losses(tmp_path / "a"), losses(tmp_path / "b")):
        assert abs(x - y) <= 1e-5 * abs(y)


def test_schedules():
    cfg = TrainConfig(steps=100, lr=1.0, min_lr=0.1, warmup_steps=10, schedule="cosine")
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1)
    mid = lr_at(54, cfg)
    assert 0.5 < mid < 0.6  # halfway through the cosine: (1 + 0.1) / 2
    wsd = TrainConfig(steps=100, lr=1.0, min_lr=0.0, warmup_steps=10, schedule="wsd", decay_fraction=0.2)
    assert [lr_at(s, wsd) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]
    assert lr_at(80, wsd) == pytest.approx(1 - 1 / 20)
    assert lr_at(99, wsd) == pytest.approx(0.0)
    assert all(lr_at(s, wsd) >= lr_at(s + 1, wsd) for s in range(10, 99))


def test_weight_decay_skips_biases_and_norms(tmp_path, shard):
    from megaqwen.models import build_model, get_config
    from megaqwen.train.optim import param_groups

    model = build_model(get_config("debug", vocab_size=64))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith(("norm.weight", "bias")) for p in no_decay["params"])
    assert all(names[id(p)].endswith("weight") and p.ndim == 2 for p in decay["params"])


@pytest.mark.parametrize("overrides, match", [
    (["train.global_batch_size=5"], "global_batch_size=5 is not divisible by train.micro_batch_size=2"),
    (["train.schedule=linear"], "train.schedule='linear'"),
    (["train.min_lr=1.0"], "min_lr"),
    (["model.num_kv_heads=3"], "num_heads=4 is not divisible by num_kv_heads=3"),
    (["train.engine=deepspeed"], "train.engine=deepspeed needs a distributed launch"),
    (["train.engine=deepspeed", "parallel.zero_stage=4"], r"parallel.zero_stage\) must be 1, 2 or 3, got 4"),
    (["train.engine=deepspeed", "parallel.zero_stage=2", "parallel.offload_params=true"],
     "parallel.offload_params needs ZeRO stage 3, got stage 2"),
])
def test_bad_config_fails_before_work(tmp_path, shard, overrides, match, make_config, monkeypatch):
    from megaqwen.train import assemble

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the config was checked")

    monkeypatch.setattr(assemble, "build_model_for_run", no_model)
    with pytest.raises(ValueError, match=match):
        train(make_config(tmp_path, shard, *overrides))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_init_from_rejects_mismatched_model(tmp_path, shard, make_config):
    train(make_config(tmp_path / "src", shard, "train.steps=3"))
    cfg = make_config(tmp_path / "dst", shard, f"train.init_from={tmp_path / 'src'}",
                      "model.num_layers=3")
    with pytest.raises(ValueError, match="num_layers"):
        train(cfg)


def test_cli_entry_point_runs_with_overrides(tmp_path, shard):
    """The real `megaqwen-train` console script, Hydra overrides on the command line, W&B offline."""
    exe = Path(sys.executable).with_name("megaqwen-train")
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    cmd = [str(exe), f"train.out_dir={tmp_path}", f"data.path={shard}", "model.vocab_size=512",
           "train.steps=2", "train.seq_len=16", "train.global_batch_size=2", "train.micro_batch_size=1",
           "train.lr=3e-4"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(losses(tmp_path)) == 2
    assert list((tmp_path / "wandb").glob("offline-run-*")), "no offline W&B run written"
    assert (tmp_path / ".hydra" / "config.yaml").exists()
    meta = json.loads((ckpt.latest_checkpoint(tmp_path / "checkpoints") / "meta.json").read_text())
    assert meta["step"] == 2 and meta["config"]["train"]["lr"] == 3e-4


def test_embedded_default_data_is_the_shipped_sample(tmp_path):
    """data.path=sample (the default) tokenises the corpus shipped in the package, then trains on it."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module("megaqwen.conf", version_base="1.3"):
        dcfg = compose("config", overrides=[f"train.out_dir={tmp_path}", "train.steps=2",
                                            "train.seq_len=32", "train.global_batch_size=2",
                                            "logger.wandb.enabled=false"])
    cfg = OmegaConf.to_object(dcfg)
    assert cfg.data.path == "sample" and cfg.model.vocab_size == 151_936
    train(cfg)
    stats = json.loads((tmp_path / "data" / "sample.stats.json").read_text())
    assert stats["documents"] > 300 and stats["malformed"] > 0  # the corpus plants malformed lines
    assert len(losses(tmp_path)) == 2
