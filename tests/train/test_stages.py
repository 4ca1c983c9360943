"""megaqwen-stages: the debug three-stage chain end to end, resuming across each switch with the new
RoPE base and length; a recipe made for another stage is refused; chain files are validated."""

import json

import pytest
import torch

from megaqwen.train.checkpoint import read_meta
from megaqwen.train.data_check import check_recipe
from megaqwen.train.stages import load_chain, main, stage_configs

SMALL = ["model.vocab_size=512", "train.lock_timeout_min=1"]


def test_shipped_chains_load():
    q, t, d = (load_chain(n) for n in ("qwen2.5", "turbo", "debug"))
    assert [s.seq_len for s in q.stages] == [4096, 32768]
    assert [s.rope_theta for s in q.stages] == [1e4, 1e6]
    assert [s.seq_len for s in t.stages] == [32768, 65536, 131072, 262144]
    assert {s.rope_theta for s in t.stages} == {1e7}
    assert [(s.seq_len, s.rope_theta) for s in d.stages] == [(128, 1e4), (512, 1e6), (2048, 1e7)]


def test_debug_chain_runs_and_resumes_across_each_switch(tmp_path, shard, capsys):
    out = tmp_path / "run"
    extra = [f"train.out_dir={out}", f"data.path={shard}", "train.warmup_steps=2", *SMALL]
    assert main(["debug", "--no-passkey", *extra]) == 0  # passkey needs the real vocabulary
    record = json.loads((out / "stages.json").read_text())
    stages = record["stages"]
    assert [s["status"] for s in stages] == ["done"] * 3
    assert [(s["start_step"], s["end_step"]) for s in stages] == [(0, 4), (4, 6), (6, 8)]
    assert stages[0]["resumed_from"] is None
    for prev, cur in zip(stages, stages[1:]):
        assert cur["resumed_from"] == prev["final_checkpoint"]  # each stage continues the last one
    assert stages[1]["allow_changes"] == ["model.max_position_embeddings", "model.rope_theta",
                                          "train.global_batch_size", "train.seq_len"]
    for s in stages:  # each stage's final checkpoint carries that stage's base and length
        meta = read_meta(s["final_checkpoint"])
        assert meta["model_config"]["rope_theta"] == s["rope_theta"]
        assert meta["resume"]["train.seq_len"] == s["seq_len"]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r and "step" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    # each stage restarts its 2-step warmup (constant schedule): half the peak at each stage's first step
    peak = max(r["lr"] for r in steps)
    assert [r["lr"] / peak for r in steps] == [0.5, 1, 1, 1, 0.5, 1, 0.5, 1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    # a rerun has nothing left to do and says so per stage
    capsys.readouterr()
    assert main(["debug", "--no-passkey", *extra]) == 0
    assert "steps 6..8" in capsys.readouterr().out


def test_recipe_for_another_stage_is_refused(tmp_path, shard):
    recipe = tmp_path / "stage-32k.json"
    recipe.write_text(json.dumps({"name": "stage-32k", "datasets": [{"prefix": shard, "weight": 1}]}))
    (tmp_path / "stage-32k.meta.json").write_text(json.dumps({"seq_length": 32768, "rope_base": 1e6}))
    assert check_recipe(str(recipe), 32768, 1e6)["seq_length"] == 32768
    with pytest.raises(ValueError, match=r"seq_length 32768 \(the stage trains at 128\) and rope_base"):
        check_recipe(str(recipe), 128, 1e4)
    chain = load_chain("debug")
    with pytest.raises(ValueError, match="seq_length 32768"):  # before anything runs
        stage_configs(chain, [f"train.out_dir={tmp_path / 'r'}", f"data.path={recipe}", *SMALL])
    assert not (tmp_path / "r").exists()


def test_bad_chain_files_are_named(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("stages:\n  - {name: a, seq_len: 64, rope_theta: 1e4, steps: 1, tokens_per_batch: 100}\n")
    with pytest.raises(ValueError, match="tokens_per_batch=100 is not a multiple of seq_len=64"):
        load_chain(str(bad))
    bad.write_text("stages:\n  - {name: a, seq_len: 64, rope_base: 1e4, steps: 1}\n")
    with pytest.raises(ValueError, match=r"unknown keys \['rope_base'\]"):
        load_chain(str(bad))
    with pytest.raises(ValueError, match="shipped chains"):
        load_chain("nope")


@pytest.mark.slow
def test_chain_ends_with_a_passkey_heat_map(tmp_path, capsys):
    """Two tiny stages on the shipped sample corpus (the real vocabulary), then the chain's passkey
    evaluation of the final checkpoint: heat map, table and per-cell results in the run folder."""
    chain = tmp_path / "tiny.yaml"
    chain.write_text(
        "name: tiny\n"
        "overrides: [model=debug, logger.wandb.enabled=false, train.save_every=0, train.micro_batch_size=1]\n"
        "stages:\n"
        "  - {name: a, seq_len: 32, rope_theta: 1e4, tokens_per_batch: 64, steps: 1}\n"
        "  - {name: b, seq_len: 64, rope_theta: 1e6, tokens_per_batch: 64, steps: 1}\n"
        "passkey: {lengths: [64, 96], depths: [0.0, 1.0], trials: 1}\n")
    out = tmp_path / "run"
    assert main([str(chain), f"train.out_dir={out}", "train.lock_timeout_min=1"]) == 0
    assert "passkey heat map" in capsys.readouterr().out
    record = json.loads((out / "stages.json").read_text())
    cells = record["passkey"]["cells"]
    assert {(c["length"], c["depth"]) for c in cells} == {(64, 0.0), (64, 1.0), (96, 0.0), (96, 1.0)}
    assert all(0 <= c["accuracy"] <= 1 and c["mean_logprob"] < 0 for c in cells)
    assert (out / "passkey" / "passkey.png").stat().st_size > 1000
    assert "| depth \\ length | 64 | 96 |" in (out / "passkey" / "passkey.md").read_text()
