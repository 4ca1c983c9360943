"""The trainer trains a Qwen2-MoE spec end to end: the load-balancing loss is added with its
coefficient (it changes the updates) and logged."""

from __future__ import annotations

import json

from megaqwen.train.loop import train


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_moe_model_trains_with_its_aux_loss(tmp_path, shard, make_config):
    runs = {}
    for coef in ("0.0", "1.0"):
        out = tmp_path / f"coef{coef}"
        cfg = make_config(out, shard, "model=debug-moe", "train.steps=8", "train.lr=3e-3",
                          "train.save_every=0", f"model.router_aux_loss_coef={coef}")
        assert cfg.model.arch == "qwen2_moe"
        train(cfg)
        runs[coef] = _rows(out)
    off, on = runs["0.0"], runs["1.0"]
    assert all(0 < r["aux_loss"] < 100 for r in on + off)  # logged either way
    assert off[0]["loss"] == on[0]["loss"]  # same start: the LM loss itself excludes the aux term
    assert off[-1]["loss"] != on[-1]["loss"]  # the coefficient reached the gradients
    assert sum(r["loss"] for r in on[-3:]) < sum(r["loss"] for r in on[:3])  # it learns


def test_moe_run_from_stock_hf_export_with_routing_bias_and_z_loss(tmp_path, shard, make_config):
    """A stock HF Qwen2-MoE folder (no routing bias) starts a run with the aux-free bias on: the
    bias starts at zero, the training-only coefficients may differ from the source's, and the bias
    moves load toward balance while z-loss and load metrics are logged."""
    from megaqwen.convert.hf import to_hf

    pre = tmp_path / "pre"
    train(make_config(pre, shard, "model=debug-moe", "train.steps=2", "train.save_every=0"))
    hf = to_hf(pre, tmp_path / "hf", tokenizer=False)
    out = tmp_path / "biased"
    train(make_config(out, shard, "model=debug-moe", "train.steps=3", "train.save_every=0",
                      f"train.init_from={hf}", "model.moe_routing_bias_update_rate=0.05",
                      "model.router_z_loss_coef=0.001"))
    rows = _rows(out)
    assert all(r["z_loss"] > 0 and r["moe/load_max"] >= 1.0 for r in rows)
    assert (out / "expert_load.png").exists()
